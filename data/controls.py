"""ControlNet control images: read from a shard member, or computed from the training image.

A control must line up with its image pixel for pixel, so a member goes through the very crop
and flip the image got (the decoder hands over `crop_like`, which replays them), and a computed
control is computed from the cropped image itself. Controls come out as RGB PIL images; the
decoder turns them into ``control_values`` [3, H, W] in [0, 1], the range diffusers' ControlNet
pipelines feed (their control image processor does not normalise to [-1, 1]).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from data.transforms import decode_image

Raw = dict[str, Any]
CropLike = Callable[[Image.Image], Image.Image]
# (raw sample, the cropped image, the original (w, h), crop_like) -> control or a skip reason
Control = Callable[[Raw, Image.Image, tuple[int, int], CropLike], "Image.Image | str"]


class MemberControl:
    """The control image stored beside the image, e.g. ``KEY.control.png`` (member
    ``control.png``), the same size as the image."""

    def __init__(self, member: str = "control.png", max_pixels: int = 178_956_970) -> None:
        self.member, self.max_pixels = member, max_pixels

    def __call__(
        self, raw: Raw, image: Image.Image, original: tuple[int, int], crop_like: CropLike
    ) -> Image.Image | str:
        """The control cropped like the image (``image``, already cropped), or a skip reason
        (``missing_control``, ``control_size: ...``, ``decode_error: ...``). ``original``: the
        image's (w, h) in the shard."""
        data = raw.get(self.member)
        if not data:
            return "missing_control"
        try:
            control = decode_image(data, self.max_pixels)
        except Exception as exn:  # PIL raises many types for broken files
            return f"decode_error: {self.member}: {exn!r}"
        if control.size != tuple(original):
            return (f"control_size: {self.member} is {control.size[0]}x{control.size[1]}, the "
                    f"image {original[0]}x{original[1]}")  # fmt: skip
        return crop_like(control)


MASK_MODES = ("1", "L", "I", "I;16", "F")  # PIL's single-channel modes


class MemberMask:
    """An inpainting mask stored beside the image, e.g. ``KEY.mask.png`` (member ``mask.png``):
    one channel, the image's size, white where the model learns to repaint."""

    def __init__(self, member: str = "mask.png", max_pixels: int = 178_956_970) -> None:
        self.member, self.max_pixels = member, max_pixels

    def __call__(
        self, raw: Raw, image: Image.Image, original: tuple[int, int], crop_like: CropLike
    ) -> Image.Image | str:
        """The mask ("L") cropped like the image, or a skip reason (``missing_mask``,
        ``mask_size: ...``, ``decode_error: ...``)."""
        data = raw.get(self.member)
        if not data:
            return "missing_mask"
        try:
            mask = Image.open(io.BytesIO(data))
            if mask.size[0] * mask.size[1] > self.max_pixels:
                return f"too_large: {self.member} is {mask.size[0]}x{mask.size[1]}"
            mask.load()
        except Exception as exn:  # PIL raises many types for broken files
            return f"decode_error: {self.member}: {exn!r}"
        if mask.mode not in MASK_MODES:
            return (f"mask_size: {self.member} has {len(mask.getbands())} channels "
                    f"({mask.mode}); a mask has one")  # fmt: skip
        if mask.size != tuple(original):
            return (f"mask_size: {self.member} is {mask.size[0]}x{mask.size[1]}, the image "
                    f"{original[0]}x{original[1]}")  # fmt: skip
        return crop_like(mask.convert("L"))


def _rgb(mask: np.ndarray) -> Image.Image:
    return Image.fromarray(np.repeat(mask[..., None], 3, axis=2).astype(np.uint8) * 255)


class ForegroundMask:
    """White where the image differs from its background (the median colour of its border) by
    more than `threshold` in RGB distance, else black: the shape's mask on the shapes data."""

    def __init__(self, threshold: float = 40.0) -> None:
        self.threshold = float(threshold)

    def __call__(
        self, raw: Raw, image: Image.Image, original: tuple[int, int], crop_like: CropLike
    ) -> Image.Image:
        arr = np.asarray(image, dtype=np.float32)
        border = np.concatenate([arr[0], arr[-1], arr[1:-1, 0], arr[1:-1, -1]])
        distance = np.linalg.norm(arr - np.median(border, axis=0), axis=-1)
        return _rgb(distance > self.threshold)


class Edges:
    """Binary edges: pixels whose luminance differs from one of their 4 neighbours by more than
    `threshold` x 255 (both sides of a step). Dependency-free; Canny needs OpenCV's 60 MB
    wheel."""

    def __init__(self, threshold: float = 0.1) -> None:
        self.threshold = float(threshold)

    def __call__(
        self, raw: Raw, image: Image.Image, original: tuple[int, int], crop_like: CropLike
    ) -> Image.Image:
        lum = np.pad(np.asarray(image.convert("L"), dtype=np.float32), 1, mode="edge")
        centre = lum[1:-1, 1:-1]
        steps = [np.abs(centre - lum[1:-1, :-2]), np.abs(centre - lum[1:-1, 2:]),
                 np.abs(centre - lum[:-2, 1:-1]), np.abs(centre - lum[2:, 1:-1])]  # fmt: skip
        return _rgb(np.max(steps, axis=0) > self.threshold * 255)


def to_mask_tensor(image: Image.Image) -> Any:
    """A one-channel PIL mask to float32 [1, H, W] in {0, 1} (1 where above half-grey)."""
    import torch

    arr = np.array(image.convert("L"), dtype=np.uint8) > 127
    return torch.from_numpy(arr).float().unsqueeze(0)


def to_unit_tensor(image: Image.Image) -> Any:
    """RGB PIL image to float32 CHW in [0, 1]."""
    import torch

    arr = np.array(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)
