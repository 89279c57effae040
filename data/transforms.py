"""Per-sample and per-batch transforms for image-text WebDataset samples.

Everything here runs inside DataLoader workers. Skipped samples are counted in a
:class:`SkipCounter` that travels out of the worker inside each batch (``batch["skipped"]``),
because a worker's memory is not visible to the training process.
"""

from __future__ import annotations

import io
import logging
import random
import warnings
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image

log = logging.getLogger(__name__)

SKIP_REASONS: tuple[str, ...] = (
    "decode_error",
    "missing_caption",
    "missing_image",
    "too_large",
    "tar_error",
)
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
        self.totals = dict.fromkeys(SKIP_REASONS, 0)
        self.pending = dict.fromkeys(SKIP_REASONS, 0)

    def see(self) -> None:
        self.seen += 1

    def skip(self, reason: str, key: str, detail: str = "") -> None:
        self.totals[reason] += 1
        self.pending[reason] += 1
        n = self.totals[reason]
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
        skipped = sum(self.totals.values())
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
        out, self.pending = self.pending, dict.fromkeys(SKIP_REASONS, 0)
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


def resize_crop(
    image: Image.Image, resolution: int, center_crop: bool, flip: bool, rng: random.Random
) -> Image.Image:
    """Shorter side to ``resolution`` (bicubic, antialiased), square crop, optional h-flip."""
    width, height = image.size
    scale = resolution / min(width, height)
    new_w = max(resolution, round(width * scale))
    new_h = max(resolution, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=None)
    if center_crop:
        left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    else:
        left, top = rng.randint(0, new_w - resolution), rng.randint(0, new_h - resolution)
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image to float32 CHW in [-1, 1]."""
    arr = np.array(image, dtype=np.uint8)
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


class SampleDecoder:
    """``wds.map`` stage: raw tar sample -> {"pixel_values", "caption", "key"} or None (skip)."""

    def __init__(
        self,
        resolution: int,
        counter: SkipCounter,
        caption_key: str = "txt",
        image_keys: tuple[str, ...] = ("jpg", "jpeg", "png", "webp"),
        center_crop: bool = True,
        random_flip: bool = False,
        max_pixels: int = 178_956_970,
        seed: int = 0,
    ) -> None:
        self.resolution = resolution
        self.counter = counter
        self.caption_key = caption_key
        self.image_keys = image_keys
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.max_pixels = max_pixels
        self.seed = seed
        self._rng: random.Random | None = None

    def _worker_rng(self) -> random.Random:
        # Created on first use so each worker (and rank) gets its own stream of crops and flips.
        if self._rng is None:
            rank, _, worker, _ = wds.utils.pytorch_worker_info()
            self._rng = random.Random(f"{self.seed}-{rank}-{worker}")
        return self._rng

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any] | None:
        key = str(sample.get("__key__", "?"))
        self.counter.see()
        image_key = next((k for k in self.image_keys if k in sample), None)
        if image_key is None:
            self.counter.skip("missing_image", key, f"members: {sorted(sample)}")
            return None
        raw_caption = sample.get(self.caption_key) or b""
        caption = raw_caption.decode("utf-8", errors="replace").strip()
        if not caption:
            self.counter.skip("missing_caption", key, f"no {self.caption_key!r} text")
            return None
        try:
            image = decode_image(sample[image_key], self.max_pixels, self.resolution)
        except ImageTooLarge as exn:
            self.counter.skip("too_large", key, str(exn))
            return None
        except Exception as exn:  # PIL raises many types for broken files
            self.counter.skip("decode_error", key, repr(exn))
            return None
        image = resize_crop(
            image, self.resolution, self.center_crop, self.random_flip, self._worker_rng()
        )
        return {"pixel_values": to_tensor(image), "caption": caption, "key": key}


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


class Collate:
    """``wds.batched`` collation: stack images, tokenize captions, attach skip counts."""

    def __init__(self, tokenizer: Any, counter: SkipCounter) -> None:
        self.tokenizer = tokenizer
        self.counter = counter

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        captions = [s["caption"] for s in samples]
        # No tokenizer: an image-only stage (the autoencoder) that never reads tokens.
        tokens = tokenize(self.tokenizer, captions) if self.tokenizer is not None else {}
        return {
            "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
            **tokens,
            "caption": captions,
            "key": [s["key"] for s in samples],
            "skipped": self.counter.take(),
        }
