"""ControlNet control images in the decoder: a shard member goes through the image's own crop and
flip, computed controls line up with the image, and bad controls are skipped and counted."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from data.controls import Edges, ForegroundMask, MemberControl, MemberMask
from data.decoders import ImageDecoder
from data.transforms import SkipCounter


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def noise_image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def decoder(control, counter: SkipCounter | None = None) -> ImageDecoder:
    counter = counter or SkipCounter(1.0, "test")
    return ImageDecoder(16, counter, center_crop=False, random_flip=True, control=control)


def test_a_control_member_is_cropped_and_flipped_exactly_like_the_image() -> None:
    # The control is the image itself: any difference in scaling, crop or flip would show.
    image = noise_image(40, 24)
    raw = {"__key__": "k", "png": png(image), "control.png": png(image), "txt": "a"}
    crops, flips = set(), 0
    for seed in range(12):
        out = decoder(MemberControl())(dict(raw), random.Random(seed))
        assert out is not None
        assert out["control_values"].shape == (3, 16, 16)
        assert out["control_values"].min() >= 0 and out["control_values"].max() <= 1
        torch.testing.assert_close(out["control_values"], (out["pixel_values"] + 1) / 2,
                                   atol=1e-6, rtol=0)  # fmt: skip
        crops.add(tuple(out["crop_top_left"].tolist()))
        plain = ImageDecoder(16, SkipCounter(1.0, "t"), center_crop=False, random_flip=False)
        unflipped = plain(dict(raw), random.Random(seed))["pixel_values"]  # the same crop
        flips += not torch.equal(unflipped, out["pixel_values"])
    assert len(crops) > 3 and flips > 0  # random crops and flips were drawn and replayed


def test_missing_or_missized_control_members_are_skipped_and_counted() -> None:
    counter = SkipCounter(1.0, "test")
    dec = decoder(MemberControl("control.png"), counter)
    image = noise_image(32, 32)
    assert dec({"__key__": "a", "png": png(image), "txt": "a"}, random.Random(0)) is None
    small = {"__key__": "b", "png": png(image), "control.png": png(noise_image(16, 16)),
             "txt": "a"}  # fmt: skip
    assert dec(small, random.Random(0)) is None
    broken = {"__key__": "c", "png": png(image), "control.png": b"not an image", "txt": "a"}
    assert dec(broken, random.Random(0)) is None
    assert counter.totals["missing_control"] == 1
    assert counter.totals["control_size"] == 1
    assert counter.totals["decode_error"] == 1
    good = {"__key__": "d", "png": png(image), "control.png": png(image), "txt": "a"}
    assert dec(good, random.Random(0)) is not None


def test_the_foreground_mask_is_the_shape_and_edges_are_its_outline() -> None:
    image = Image.new("RGB", (16, 16), (128, 128, 128))
    image.paste((230, 30, 30), (4, 6, 10, 12))  # a 6 x 6 square at x 4..9, y 6..11
    want = np.zeros((16, 16), bool)
    want[6:12, 4:10] = True
    raw = {"__key__": "k", "png": png(image), "txt": "a"}
    out = ImageDecoder(16, SkipCounter(1.0, "t"), control=ForegroundMask())(raw, random.Random(0))
    mask = out["control_values"]
    assert torch.equal(mask[0] > 0.5, torch.from_numpy(want))
    assert torch.equal(mask[0], mask[1]) and torch.equal(mask[0], mask[2])  # RGB, grey
    edges = ImageDecoder(16, SkipCounter(1.0, "t"), control=Edges())(raw, random.Random(0))
    edge = edges["control_values"][0] > 0.5
    # Both sides of each of the square's sides; nothing inside, outside or at the border.
    assert all(edge[y, x] for y, x in [(6, 6), (5, 6), (11, 6), (12, 6), (8, 4), (8, 3), (8, 9)])
    assert not edge[8, 6] and not edge[0, 0] and not edge[0, 8] and not edge[8, 15]


def test_a_control_on_encoded_shards_is_refused(tmp_path) -> None:
    from data.datamodule import WebDatasetDataModule
    from data.shards import write_demo_shards

    write_demo_shards(tmp_path, num_samples=4, samples_per_shard=4, size=16, seed=0)
    with pytest.raises(ValueError, match="data.control is set but data.latents=true"):
        WebDatasetDataModule(urls=str(tmp_path), latents=True, control=ForegroundMask(),
                             sizes_cache=str(tmp_path / "sizes.json"))  # fmt: skip


def test_a_mask_member_is_cropped_like_the_image_and_must_have_one_channel() -> None:
    image = noise_image(40, 24)
    grey = image.convert("L")
    raw = {"__key__": "k", "png": png(image), "mask.png": png(grey), "txt": "a"}
    counter = SkipCounter(1.0, "test")
    dec = ImageDecoder(16, counter, center_crop=False, random_flip=True, mask=MemberMask())
    for seed in range(6):
        out = dec(dict(raw), random.Random(seed))
        assert out["mask"].shape == (1, 16, 16) and set(out["mask"].unique().tolist()) <= {0, 1}
        # The mask is the image's own luminance, thresholded: the same crop and flip.
        luma = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
        lum = ((out["pixel_values"] + 1) / 2 * luma).sum(0)
        agree = ((lum > 0.5) == (out["mask"][0] > 0.5)).float().mean()
        assert agree > 0.97, (seed, agree)
    rgb = dict(raw, **{"mask.png": png(image)})
    assert dec(rgb, random.Random(0)) is None
    assert dec({"__key__": "m", "png": png(image), "txt": "a"}, random.Random(0)) is None
    assert counter.totals["mask_size"] == 1 and counter.totals["missing_mask"] == 1
