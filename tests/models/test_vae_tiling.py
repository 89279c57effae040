"""Tiled VAE encode and decode (train.models.vae_tiling): diffusers' tiling with our tile and
stride, for the video VAEs (sizes as enable_tiling arguments) and AutoencoderKL (as attributes);
a tile as large as the frame changes nothing, a smaller one cuts the frame and blends close to
the untiled result; the config tiles the training VAE. Peak memory is measured by
benchmarks/video_memory.py, not here."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLWan
from hydra.utils import instantiate

from train.config.compose import compose
from train.errors import ConfigError
from train.models.vae_tiling import VaeTiling


def tiny_wan_vae() -> AutoencoderKLWan:
    """model/vae=wan_tiny, seeded."""
    torch.manual_seed(0)
    return instantiate(compose(["experiment=wan_tiny"]).model.vae).eval()


@torch.no_grad()
def test_a_video_vae_decodes_a_clip_in_tiles_close_to_whole() -> None:
    vae = tiny_wan_vae()
    clip = torch.rand(1, 3, 5, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = vae.encode(clip).latent_dist.mean  # [1, 16, 2, 8, 8]
    whole = vae.decode(z).sample
    VaeTiling(tile=64, stride=48).apply(vae)  # the frame fits one tile: untouched
    torch.testing.assert_close(vae.decode(z).sample, whole)
    VaeTiling(tile=32, stride=24).apply(vae)  # 2 x 2 tiles, 8 px blended
    assert (vae.tile_sample_min_height, vae.tile_sample_stride_width) == (32, 24)
    assert vae.use_slicing
    tiled = vae.decode(z).sample
    assert tiled.shape == whole.shape == (1, 3, 5, 64, 64)
    # Random weights: seams differ a little, a misplaced tile would differ by the signal itself.
    error = (tiled - whole).abs().mean() / whole.abs().mean()
    assert 0 < error < 0.3, error
    assert vae.encode(clip).latent_dist.mean.shape == z.shape


def test_autoencoderkl_gets_the_tile_as_its_attributes() -> None:
    vae = instantiate(compose(["experiment=tiny"]).model.vae)  # 2 blocks: 2x downsampling
    VaeTiling(tile=32, stride=24, slicing=False).apply(vae)
    assert vae.use_tiling and not vae.use_slicing
    assert (vae.tile_sample_min_size, vae.tile_latent_min_size) == (32, 16)
    assert vae.tile_overlap_factor == pytest.approx(0.25)
    with torch.no_grad():
        assert vae.decode(torch.zeros(1, 4, 32, 32)).sample.shape == (1, 3, 64, 64)


def test_a_stride_longer_than_the_tile_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"model.vae_tiling: tile=32, stride=40; the stride"):
        VaeTiling(tile=32, stride=40)


def test_the_config_tiles_the_training_vae() -> None:
    cfg = compose(["experiment=wan_tiny", "model/vae_tiling=tiles", "model.vae_tiling.tile=128"])
    module = instantiate(cfg.model)
    assert module.vae.use_tiling and module.vae.tile_sample_min_width == 128
    assert not instantiate(compose(["experiment=wan_tiny"]).model).vae.use_tiling


def test_tiles_off_the_latent_grid_are_refused() -> None:
    vae = tiny_wan_vae()  # 8x downsampling
    with pytest.raises(ConfigError, match=r"model.vae_tiling.stride=12: the VAE downsamples 8x"):
        VaeTiling(tile=16, stride=12).apply(vae)
    with pytest.raises(ConfigError, match=r"model.vae_tiling.tile=20: .* a multiple of 8"):
        VaeTiling(tile=20).apply(vae)
    assert VaeTiling(tile=24).stride_for(8) == 16  # three quarters, down to the latent grid
