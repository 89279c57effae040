"""The frozen parts of latent diffusion: held outside the module tree, and the VAE's factor."""

from __future__ import annotations

from typing import Any

from diffusers import AutoencoderKL


class FrozenParts:
    """A plain holder (not an nn.Module) for the frozen VAE and text conditioner."""

    def __init__(self, vae: AutoencoderKL, conditioner: Any) -> None:
        self.vae, self.conditioner = vae, conditioner


def vae_scale_factor(vae: AutoencoderKL) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)
