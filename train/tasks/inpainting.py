"""An inpainting UNet's extra inputs, made from the batch as diffusers' inpainting pipelines make
them at sampling time (`StableDiffusionInpaintPipeline.prepare_mask_latents`): the masked image
is ``image * (mask < 0.5)``, encoded by the frozen VAE and scaled like the latents; the mask is
resized (nearest) to the latents' size."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from train.models.parts import normalize_latents
from train.tasks.rng import SampleRNG


def inputs(module: Any, batch: dict, rng: SampleRNG) -> torch.Tensor:
    """[B, 1 + C, h, w]: the mask at the latents' size, then the masked image's latents. The
    mask is the batch's (``data.mask``, a shard member) or drawn by the backbone's masks."""
    pixels = batch["pixel_values"]  # [B, 3, H, W] in [-1, 1]
    mask = batch.get("mask")
    if mask is None:
        mask = module.backbone.masks.draw(rng, *pixels.shape[-2:])
    mask = mask.to(device=pixels.device, dtype=pixels.dtype)  # [B, 1, H, W], 1 = repaint
    masked = pixels * (mask < 0.5)
    with torch.no_grad():
        posterior = module.vae.encode(masked.to(module.vae.dtype)).latent_dist
    eps = rng.randn(tuple(posterior.mean.shape[1:]), posterior.mean.dtype)
    latents = normalize_latents(module.vae, posterior.mean + posterior.std * eps)
    small = F.interpolate(mask, size=latents.shape[-2:])  # nearest, as the pipelines resize it
    return torch.cat([small.to(latents.dtype), latents], dim=1)
