"""Aspect-ratio buckets (SDXL, Podell et al. 2023, section 2.3) and resize-crop to a target size.

Why by hand: diffusers and webdataset have no bucketing; kohya/SimpleTuner's versions are tied
to their own loaders.
"""

from __future__ import annotations

import math
import random

from PIL import Image


class AspectBuckets:
    """Sizes (w, h), multiples of ``step``, with about ``resolution**2`` pixels and aspect ratios
    up to ``max_ratio``; an image goes to the bucket of nearest log aspect ratio."""

    def __init__(self, resolution: int, step: int = 64, max_ratio: float = 2.0) -> None:
        if resolution % step:
            raise ValueError(f"data.resolution={resolution} is not a multiple of step={step}")
        area = resolution * resolution
        sizes = set()
        w = step
        while w <= resolution * max_ratio:
            h = int(area / w) // step * step
            if h >= step and 1 / max_ratio <= w / h <= max_ratio:
                sizes.add((w, h))
            w += step
        self.sizes = sorted(sizes, key=lambda s: s[0] / s[1])
        self._log_ratios = [math.log(w / h) for w, h in self.sizes]

    def __len__(self) -> int:
        return len(self.sizes)

    def index(self, width: int, height: int) -> int:
        ratio = math.log(width / max(height, 1))
        return min(range(len(self.sizes)), key=lambda i: abs(self._log_ratios[i] - ratio))

    def size(self, width: int, height: int) -> tuple[int, int]:
        return self.sizes[self.index(width, height)]


def resize_crop(
    image: Image.Image,
    target: tuple[int, int],
    center_crop: bool,
    flip: bool,
    rng: random.Random,
) -> tuple[Image.Image, tuple[int, int]]:
    """Scale to cover ``target`` (w, h) (bicubic, antialiased), crop to it, optional h-flip.

    Returns the image and the crop's (top, left) in the scaled image: SDXL's
    ``crops_coords_top_left`` conditioning.
    """
    tw, th = target
    width, height = image.size
    scale = max(tw / width, th / height)
    new_w, new_h = max(tw, round(width * scale)), max(th, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=None)
    if center_crop:
        left, top = (new_w - tw) // 2, (new_h - th) // 2
    else:
        left, top = rng.randint(0, new_w - tw), rng.randint(0, new_h - th)
    image = image.crop((left, top, left + tw, top + th))
    if flip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image, (top, left)
