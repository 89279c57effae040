"""Stage 1's random training crops: windows of the input, one per sample, whole images kept."""

import pytest
import torch

from train.tasks.autoencoder import random_crop


def test_each_crop_is_a_window_of_its_own_sample():
    torch.manual_seed(0)
    pixels = torch.arange(4 * 3 * 32 * 32, dtype=torch.float32).reshape(4, 3, 32, 32)
    crops = random_crop(pixels, 24)
    assert crops.shape == (4, 3, 24, 24)
    offsets = set()
    for x, c in zip(pixels, crops, strict=True):
        # the top-left value locates the window; every value of the window must match
        flat = (x[0] == c[0, 0, 0]).nonzero()
        assert len(flat) == 1
        t, s = flat[0].tolist()
        assert torch.equal(c, x[:, t : t + 24, s : s + 24])
        offsets.add((t, s))
    assert len(offsets) > 1  # per-sample windows, not one offset for the batch


def test_no_crop_or_too_large_crop_keeps_the_batch():
    pixels = torch.randn(2, 3, 16, 16)
    assert random_crop(pixels, None) is pixels
    assert random_crop(pixels, 16) is pixels


def test_bad_crop_size_names_the_setting():
    with pytest.raises(ValueError, match="model.train_crop"):
        random_crop(torch.randn(2, 3, 16, 16), 0)
