"""The frozen parts of latent diffusion: held outside the module tree, and the VAE's geometry
and latent normalisation (an image AutoencoderKL's or a causal video VAE's, AutoencoderKLWan)."""

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
    """Spatial downsampling: a video VAE states it, an AutoencoderKL halves per extra block."""
    spatial = vae.config.get("scale_factor_spatial")
    return int(spatial) if spatial else 2 ** (len(vae.config.block_out_channels) - 1)


def vae_temporal_factor(vae: AutoencoderKL) -> int:
    """Frames per latent frame after the first (a causal video VAE's 4: F -> 1 + (F - 1) / 4);
    1 for an image VAE applied frame by frame."""
    return int(vae.config.get("scale_factor_temporal") or 1)


def is_video_vae(vae: AutoencoderKL) -> bool:
    """Whether the VAE encodes clips [B, 3, F, H, W] itself (AutoencoderKLWan's config names
    its temporal factor; an image VAE encodes frames)."""
    return vae.config.get("scale_factor_temporal") is not None


def vae_latent_channels(vae: AutoencoderKL) -> int:
    return int(vae.config.get("latent_channels") or vae.config.z_dim)


def normalize_latents(vae: AutoencoderKL, z: torch.Tensor) -> torch.Tensor:
    """What the pipelines' decode inverts: ``(z - shift_factor) * scaling_factor`` (SD, SD3,
    Flux), or per channel ``(z - latents_mean) / latents_std * scaling_factor`` (Wan's video
    VAE, which has no scaling factor; SDXL's pipeline with a VAE that states a mean and std)."""
    cfg = vae.config
    if cfg.get("latents_mean") is not None and cfg.get("latents_std") is not None:
        view = (1, -1) + (1,) * (z.ndim - 2)  # channels on dim 1: [B, C, (F,) h, w]
        mean = torch.tensor(cfg.latents_mean, dtype=z.dtype, device=z.device).view(view)
        std = torch.tensor(cfg.latents_std, dtype=z.dtype, device=z.device).view(view)
        return (z - mean) / std * float(cfg.get("scaling_factor") or 1.0)
    return (z - float(cfg.get("shift_factor") or 0.0)) * float(cfg.scaling_factor)


def posterior_of(vae: AutoencoderKL, pixels: torch.Tensor) -> DiagonalGaussianDistribution:
    """The VAE posterior of images [B, 3, H, W], or of clips [B, 3, F, H, W]: a video VAE
    encodes them whole (moments [B, 2C, 1 + (F - 1) / 4, h, w]), a 2D VAE frame by frame (as
    AnimateDiff's: moments [B, 2C, F, h, w])."""
    if pixels.ndim == 4 or is_video_vae(vae):
        return vae.encode(pixels).latent_dist
    b, c, f = pixels.shape[:3]
    frames = pixels.transpose(1, 2).reshape(b * f, c, *pixels.shape[3:])  # [B * F, 3, H, W]
    moments = vae.encode(frames).latent_dist.parameters  # [B * F, 2C, h, w]
    moments = moments.reshape(b, f, *moments.shape[1:]).transpose(1, 2)
    return DiagonalGaussianDistribution(moments)
