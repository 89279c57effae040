"""A set's images and captions in a fixed order, for evaluation (reference statistics, prompt
sets), and the fingerprint that tells whether two evaluations used the same set."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image, ImageOps

from data.decoders import IMAGE_KEYS, caption_text
from data.sources import ShardSizes, iter_raw_samples, resolve_shards
from data.transforms import decode_image

MAX_PIXELS = 178_956_970  # PIL's own decompression-bomb limit


@dataclass(frozen=True)
class EvalSample:
    key: str
    image: Image.Image  # RGB, resolution x resolution (resized and centre-cropped)
    caption: str


def set_fingerprint(urls: str | list[str]) -> tuple[str, list[str], int]:
    """(SHA-256 of the shard list with sample counts, the shards, the sample count)."""
    shards = resolve_shards(urls)
    sizes = ShardSizes()(shards)
    manifest = "".join(f"{s.rsplit('/', 1)[-1]}\t{n}\n" for s, n in zip(shards, sizes, strict=True))
    return hashlib.sha256(manifest.encode()).hexdigest(), shards, sum(sizes)


def iter_eval_samples(
    shards: list[str], resolution: int, limit: int | None = None
) -> Iterator[EvalSample]:
    """Samples in shard order, images resized and centre-cropped to ``resolution``; samples
    without an image are skipped, a broken shard raises (an evaluation set must be whole)."""

    def fail(exn: Exception) -> bool:
        raise exn

    count = 0
    for url in shards:
        for raw in iter_raw_samples(url, fail):
            data = next((raw[k] for k in IMAGE_KEYS if k in raw), None)
            if data is None:
                continue
            image = decode_image(data, MAX_PIXELS)
            image = ImageOps.fit(image, (resolution, resolution), Image.Resampling.BICUBIC)
            yield EvalSample(raw["__key__"], image, caption_text(raw))
            count += 1
            if limit is not None and count >= limit:
                return
