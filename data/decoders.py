"""Raw webdataset sample -> training sample (or None when skipped), run inside data workers.

Two kinds of shards: image shards (``jpg|png|webp`` + ``txt`` + ``json``, what img2dataset
writes) and latent shards written by ``ldm-data encode`` (``latent.npy`` + ``emb.npy`` beside
the caption and metadata). Members are parsed by hand, never unpickled: ``np.load`` runs with
``allow_pickle=False`` and images go through PIL with a pixel limit.
"""

from __future__ import annotations

import io
import random
import warnings
from typing import Any

import numpy as np
import torch
from PIL import Image

from data.buckets import AspectBuckets, resize_crop
from data.controls import Control, to_mask_tensor, to_unit_tensor
from data.metadata import IMAGE_KEYS, CaptionPicker, MetadataFilter, field, metadata_size
from data.transforms import ImageTooLarge, SkipCounter, decode_image, to_tensor

Raw = dict[str, Any]
__all__ = ["IMAGE_KEYS", "ImageDecoder", "LatentDecoder"]


def image_size(raw: Raw, image_keys: tuple[str, ...] = IMAGE_KEYS) -> tuple[int, int] | None:
    """(w, h) of the original image: from the json, else from the image header (no pixel
    decoding). Cached on the sample: filters, buckets and the decoder all ask."""
    if "__size__" not in raw:
        size = metadata_size(raw)
        key = next((k for k in image_keys if k in raw), None)
        if size is None and key is not None and raw[key]:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                try:
                    size = Image.open(io.BytesIO(raw[key])).size
                except Exception:  # unreadable header: the decoder counts it when decoding
                    size = None
        raw["__size__"] = size
    return raw["__size__"]


def file_size(data: bytes) -> tuple[int, int]:
    """(w, h) from an image member's header (the json's size may be another one's)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data)).size


def caption_text(raw: Raw) -> str:
    """The ``txt`` member, decoded and stripped (``""`` when absent)."""
    return (field(raw, "txt") or "").strip()


def _size_tensor(hw: tuple[int, int]) -> torch.Tensor:
    return torch.tensor(hw, dtype=torch.long)


def admit(
    counter: SkipCounter, raw: Raw, checked: tuple[str, str] | str
) -> tuple[str, tuple[str, str]] | None:
    """(key, (member, caption)) of a sample that passed a decoder's checks; None after counting
    the reason ``checked`` names (the sample is seen either way)."""
    key = str(raw.get("__key__", "?"))
    counter.see()
    if isinstance(checked, str):
        counter.skip(checked, key, f"members: {sorted(k for k in raw if k[0] != '_')}")
        return None
    return key, checked


def pick_caption(
    captions: CaptionPicker, raw: Raw, rng: random.Random, required: bool
) -> str | None:
    """The sample's caption; "" for an uncaptioned one where none is ``required``, else None
    (skipped as missing_caption)."""
    caption = captions(raw, rng)
    if caption is None and not required:
        return ""
    return caption


# Optional members of encoded shards -> batch keys (`ldm-data encode` writes what it has).
OPTIONAL_EMBEDDINGS = {"pooled.npy": "pooled_embeds", "emb_mask.npy": "encoder_attention_mask"}


class ImageDecoder:
    """Decode, filter, caption, resize-and-crop (to ``resolution`` or an aspect bucket).

    Samples also carry SDXL's micro-conditioning fields: ``original_size`` (h, w),
    ``crop_top_left`` (top, left) and ``target_size`` (h, w).
    """

    def __init__(
        self,
        resolution: int,
        counter: SkipCounter,
        captions: CaptionPicker | None = None,
        metadata_filter: MetadataFilter | None = None,
        buckets: AspectBuckets | None = None,
        image_keys: tuple[str, ...] = IMAGE_KEYS,
        center_crop: bool = True,
        random_flip: bool = False,
        max_pixels: int = 178_956_970,
        require_caption: bool = True,
        control: Control | None = None,
        mask: Control | None = None,
    ) -> None:
        """``control``: a ControlNet's control source (data/controls.py); samples then carry
        ``control_values`` [3, H, W] in [0, 1], cropped and flipped like the image. ``mask``:
        an inpainting mask source; samples then carry ``mask`` [1, H, W] in {0, 1}."""
        self.resolution, self.counter = resolution, counter
        self.control, self.mask = control, mask
        self.captions = captions or CaptionPicker()
        self.filter, self.buckets = metadata_filter, buckets
        self.image_keys = tuple(image_keys)
        self.center_crop, self.random_flip = center_crop, random_flip
        self.max_pixels, self.require_caption = max_pixels, require_caption

    def _image_key(self, raw: Raw) -> str | None:
        return next((k for k in self.image_keys if k in raw), None)

    def size_of(self, raw: Raw) -> tuple[int, int] | None:
        return image_size(raw, self.image_keys)

    def bucket_of(self, raw: Raw) -> int:
        size = self.size_of(raw) if self.buckets is not None else None
        return self.buckets.index(*size) if size is not None and self.buckets else 0

    def _target(self, size: tuple[int, int]) -> tuple[int, int]:
        if self.buckets is None:
            return self.resolution, self.resolution
        return self.buckets.size(*size)

    def _check(self, raw: Raw, rng: random.Random) -> tuple[str, str] | str:
        """The image member and caption, or the skip reason."""
        image_key = self._image_key(raw)
        if image_key is None:
            return "missing_image"
        if not raw[image_key]:
            return "empty_member"
        if self.filter is not None:
            reason = self.filter.reason(raw, self.size_of(raw))
            if reason is not None:
                return f"filtered_{reason}"
        caption = pick_caption(self.captions, raw, rng, self.require_caption)
        return "missing_caption" if caption is None else (image_key, caption)

    def _aligned(
        self, raw: Raw, image_key: str, image: Image.Image, crop: tuple
    ) -> dict[str, Any] | None:
        """The control image and mask (those configured), cropped and flipped like the image;
        None when one is bad (counted). ``crop``: (the rng state the image's crop was drawn
        from, the decoded size, the target size)."""
        state, decoded_size, target = crop
        sources = [(name, source, convert) for name, source, convert in (
            ("control_values", self.control, to_unit_tensor), ("mask", self.mask, to_mask_tensor),
        ) if source is not None]  # fmt: skip
        if not sources:
            return {}
        replay = random.Random()

        def crop_like(other: Image.Image) -> Image.Image:
            if other.size != decoded_size:  # the image was decoded at a reduced scale
                other = other.resize(decoded_size, Image.Resampling.BICUBIC)
            replay.setstate(state)
            return resize_crop(other, target, self.center_crop, self.random_flip, replay)[0]

        size, out = file_size(raw[image_key]), {}
        for name, source, convert in sources:
            got = source(raw, image, size, crop_like)
            if isinstance(got, str):
                reason, _, detail = got.partition(": ")
                self.counter.skip(reason, str(raw.get("__key__", "?")), detail)
                return None
            out[name] = convert(got)
        return out

    def __call__(
        self, raw: Raw, rng: random.Random, bucket: int | None = None
    ) -> dict[str, Any] | None:
        """``bucket``: the index of the aspect bucket the batch uses (else the sample's own)."""
        admitted = admit(self.counter, raw, self._check(raw, rng))
        if admitted is None:
            return None
        key, (image_key, caption) = admitted
        header_size = self.size_of(raw)
        if bucket is not None and self.buckets is not None:
            target = self.buckets.sizes[bucket]
        else:
            target = self._target(header_size) if header_size else self._target((1, 1))
        try:
            image = decode_image(raw[image_key], self.max_pixels, max(target))
        except ImageTooLarge as exn:
            self.counter.skip("too_large", key, str(exn))
            return None
        except Exception as exn:  # PIL raises many types for broken files
            self.counter.skip("decode_error", key, repr(exn))
            return None
        original = header_size or image.size
        if header_size is None and bucket is None:
            target = self._target(image.size)
        state = rng.getstate()  # the crop and flip drawn next, replayed on a control member
        decoded_size = image.size
        image, crop = resize_crop(image, target, self.center_crop, self.random_flip, rng)
        extra = self._aligned(raw, image_key, image, (state, decoded_size, target))
        if extra is None:
            return None
        return {
            "pixel_values": to_tensor(image),
            **extra,
            "caption": caption,
            "key": key,
            "original_size": _size_tensor((original[1], original[0])),
            "crop_top_left": _size_tensor(crop),
            "target_size": _size_tensor((target[1], target[0])),
        }


def load_npy(data: bytes) -> np.ndarray:
    """An ``.npy`` member, refusing object arrays (which would need pickle)."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def npy_shape(data: bytes) -> tuple[int, ...]:
    stream = io.BytesIO(data)
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, _, _ = np.lib.format.read_array_header_1_0(stream)
    else:
        shape, _, _ = np.lib.format.read_array_header_2_0(stream)
    return tuple(shape)


def encoded_sizes(raw: Raw) -> dict[str, torch.Tensor]:
    """SDXL's micro-conditioning fields from an encoded shard's ``sizes.npy`` ({} without it:
    shards encoded before it was written)."""
    if "sizes.npy" not in raw:
        return {}
    sizes = torch.from_numpy(load_npy(raw["sizes.npy"]).astype(np.int64))
    return {"original_size": sizes[0:2], "crop_top_left": sizes[2:4], "target_size": sizes[4:6]}


class LatentDecoder:
    """Samples of ``ldm-data encode`` shards: ``latent_moments`` [2C, h, w] (the VAE posterior's
    mean and log-variance), ``encoder_hidden_states`` [L, D], ``caption``, ``key``."""

    def __init__(self, counter: SkipCounter, metadata_filter: MetadataFilter | None = None) -> None:
        self.counter, self.filter = counter, metadata_filter

    def bucket_of(self, raw: Raw) -> tuple[int, ...]:
        try:
            return npy_shape(raw["latent.npy"])
        except Exception:
            return ()

    def __call__(
        self, raw: Raw, rng: random.Random, bucket: tuple[int, ...] | None = None
    ) -> dict[str, Any] | None:
        """``bucket``: the latent shape of the batch; latents cannot be resized, so a sample of
        another shape is dropped (``filtered_bucket``)."""
        key = str(raw.get("__key__", "?"))
        self.counter.see()
        if bucket is not None and self.bucket_of(raw) not in (bucket, ()):
            self.counter.skip("filtered_bucket", key)
            return None
        if "latent.npy" not in raw or "emb.npy" not in raw:
            self.counter.skip("missing_image", key, "no latent.npy/emb.npy: not an encoded shard")
            return None
        if self.filter is not None and (reason := self.filter.reason(raw, metadata_size(raw))):
            self.counter.skip(f"filtered_{reason}", key)
            return None
        try:
            moments = torch.from_numpy(load_npy(raw["latent.npy"]).astype(np.float32))
            hidden = torch.from_numpy(load_npy(raw["emb.npy"]).astype(np.float32))
            # What a family's conditioner adds: pooled embeddings (SDXL, SD3, Flux), masks.
            extra = {name: torch.from_numpy(load_npy(raw[member]).astype(np.float32))
                     for member, name in OPTIONAL_EMBEDDINGS.items() if member in raw}  # fmt: skip
        except Exception as exn:
            self.counter.skip("decode_error", key, repr(exn))
            return None
        caption = caption_text(raw)
        return {
            "latent_moments": moments,
            "encoder_hidden_states": hidden,
            **extra,
            **encoded_sizes(raw),
            "caption": caption,
            "key": key,
        }
