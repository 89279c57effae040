"""The frozen parts of latent diffusion: held outside the module tree, and the VAE's factor."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution


class FrozenParts:
    """A plain holder (not an nn.Module) for the frozen VAE and text conditioner."""

    def __init__(self, vae: AutoencoderKL, conditioner: Any) -> None:
        self.vae, self.conditioner = vae, conditioner


def vae_scale_factor(vae: AutoencoderKL) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def posterior_of(vae: AutoencoderKL, pixels: torch.Tensor) -> DiagonalGaussianDistribution:
    """The VAE posterior of images [B, 3, H, W], or of clips [B, 3, F, H, W] frame by frame
    (a 2D VAE, as AnimateDiff's): its moments are then [B, 2C, F, h, w], the clips' latents."""
    if pixels.ndim == 4:
        return vae.encode(pixels).latent_dist
    b, c, f = pixels.shape[:3]
    frames = pixels.transpose(1, 2).reshape(b * f, c, *pixels.shape[3:])  # [B * F, 3, H, W]
    moments = vae.encode(frames).latent_dist.parameters  # [B * F, 2C, h, w]
    moments = moments.reshape(b, f, *moments.shape[1:]).transpose(1, 2)
    return DiagonalGaussianDistribution(moments)
