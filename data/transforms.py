"""Per-sample and per-batch transforms for image-text WebDataset samples.

Everything here runs inside DataLoader workers. Skipped samples are counted in a
:class:`SkipCounter` that travels out of the worker inside each batch (``batch["skipped"]``),
because a worker's memory is not visible to the training process.
"""

from __future__ import annotations

import io
import logging
import warnings
from typing import Any

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)

SKIP_REASONS: tuple[str, ...] = (
    "decode_error",
    "missing_caption",
    "missing_image",
    "too_large",
    "tar_error",
    "empty_member",
    "missing_control",  # a ControlNet's control member (data.control) is absent
    "control_size",  # ... or not the image's size
    "missing_mask",  # an inpainting mask member (data.mask) is absent
    "mask_size",  # ... or not one channel of the image's size
    "missing_video",  # a video config (data.video) met a sample without a video member
)
# Samples a configured filter dropped: counted, but not bad data, so not in the skip rate.
FILTER_REASONS: tuple[str, ...] = (
    "filtered_small",
    "filtered_aspect",
    "filtered_score",
    "filtered_bucket",
    "filtered_short",  # a video shorter than the clip data.video samples
)
ALL_REASONS = SKIP_REASONS + FILTER_REASONS
MIN_SEEN_FOR_CHECK = 50


class ImageTooLarge(ValueError):
    """The image header declares more pixels than allowed."""


class SkipCounter:
    """Counts skipped samples in one worker and fails when too many are bad.

    ``take()`` hands over the counts since its previous call; the collate function attaches them
    to the batch so the training process can sum them across workers.
    """

    def __init__(self, max_skip_fraction: float, source: str) -> None:
        self.max_skip_fraction = max_skip_fraction
        self.source = source
        self.seen = 0
        self.totals = dict.fromkeys(ALL_REASONS, 0)
        self.pending = dict.fromkeys(ALL_REASONS, 0)

    def see(self) -> None:
        self.seen += 1

    def skip(self, reason: str, key: str, detail: str = "") -> None:
        self.totals[reason] += 1
        self.pending[reason] += 1
        n = self.totals[reason]
        if reason not in SKIP_REASONS:
            return
        # Log the first of each reason and then only at powers of ten, so a bad shard cannot
        # flood the log.
        if n == 1 or (n >= 10 and str(n).rstrip("0") == "1"):
            log.warning(
                "skipping sample %s (%s, %d so far in this worker): %s",
                key,
                reason,
                n,
                detail[:200],
            )
        self.check()

    def check(self) -> None:
        skipped = sum(self.totals[r] for r in SKIP_REASONS)
        if self.seen < MIN_SEEN_FOR_CHECK:
            return
        fraction = skipped / self.seen
        if fraction > self.max_skip_fraction:
            raise RuntimeError(
                f"{skipped} of {self.seen} samples ({fraction:.0%}) were skipped "
                f"({self._summary()}) in shards {self.source}, more than "
                f"data.max_skip_fraction={self.max_skip_fraction}; check the data or raise "
                "data.max_skip_fraction"
            )

    def _summary(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.totals.items() if v)

    def tar_handler(self, exn: Exception) -> bool:
        """Handler for ``wds.tarfile_to_samples``: count, warn and go on with the next item."""
        self.seen += 1
        self.skip("tar_error", "?", repr(exn))
        return True

    def take(self) -> dict[str, int]:
        out, self.pending = self.pending, dict.fromkeys(ALL_REASONS, 0)
        return out


def decode_image(data: bytes, max_pixels: int, draft_size: int | None = None) -> Image.Image:
    """Decode image bytes to RGB, refusing images larger than ``max_pixels`` before decoding.

    ``draft_size`` lets JPEG decode at a reduced scale (still at least that size), which makes
    large web images far cheaper to load.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exn:
            raise ImageTooLarge(str(exn)) from exn
        width, height = image.size
        if width * height > max_pixels:
            raise ImageTooLarge(f"{width}x{height} is more than max_pixels={max_pixels}")
        if draft_size is not None and image.format == "JPEG":
            image.draft("RGB", (draft_size, draft_size))
        image.load()
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        # Transparent areas become white, not whatever colour the hidden pixels hold.
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image to float32 CHW in [-1, 1]."""
    arr = np.array(image, dtype=np.uint8)
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def tokenize(tokenizer: Any, captions: list[str]) -> dict[str, torch.Tensor]:
    """Fixed-length token ids and attention mask (long tensors, [B, model_max_length])."""
    enc = tokenizer(
        captions,
        padding="max_length",
        truncation=True,
        max_length=tokenizer.model_max_length,
        return_tensors="pt",
    )
    return {
        "input_ids": enc["input_ids"].long(),
        "attention_mask": enc["attention_mask"].long(),
    }


def truncated(tokenizer: Any, captions: list[str]) -> torch.Tensor:
    """Which captions `tokenize` cut to `model_max_length` tokens ([B] bool; counted by
    train.callbacks.console.CaptionTruncation). Tokenized once more up to one token past the
    limit: enough to tell, and without the tokenizer's own warning about long sequences."""
    limit = tokenizer.model_max_length
    ids = tokenizer(captions, truncation=True, max_length=limit + 1)["input_ids"]
    return torch.tensor([len(row) > limit for row in ids], dtype=torch.bool)


class Collate:
    """Batch collation: stack tensors, keep strings as lists, tokenize captions, attach the
    worker's skip counts since its previous batch."""

    def __init__(self, tokenizer: Any = None) -> None:
        # No tokenizer: an image-only stage (the autoencoder) or precomputed embeddings.
        self.tokenizer = tokenizer

    def __call__(self, samples: list[dict[str, Any]], counter: SkipCounter) -> dict[str, Any]:
        batch: dict[str, Any] = {}
        for name in samples[0]:
            values = [s[name] for s in samples]
            batch[name] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
        if self.tokenizer is not None:
            batch.update(tokenize(self.tokenizer, batch["caption"]))
            batch["caption_truncated"] = truncated(self.tokenizer, batch["caption"])
        batch["skipped"] = counter.take()
        return batch
