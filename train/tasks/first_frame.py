"""An image-to-video model's first-frame inputs, made from the batch's clips as diffusers'
`WanImageToVideoPipeline.prepare_latents` makes them from the given image at sampling time: the
first frame followed by black (zero) frames, encoded by the frozen video VAE (its posterior's
mode, normalised like the latents), after a mask that marks the first frame as known."""

from __future__ import annotations

from typing import Any

import torch

from train.models.parts import normalize_latents, vae_temporal_factor


def first_frame_mask(batch: int, frames: int, height: int, width: int, factor: int) -> torch.Tensor:
    """[B, T, F', h, w] (T = the VAE's temporal factor, F' = 1 + (F - 1) / T): 1 where a pixel
    frame is given. Frame 0 is repeated T times so that each latent frame gets T mask channels,
    one per pixel frame it stands for (the layout of the Wan 2.x I2V pipelines)."""
    mask = torch.zeros(batch, 1, frames, height, width)
    mask[:, :, 0] = 1
    mask = torch.cat([mask[:, :, :1].repeat_interleave(factor, dim=2), mask[:, :, 1:]], dim=2)
    return mask.view(batch, -1, factor, height, width).transpose(1, 2)


@torch.no_grad()
def inputs(module: Any, batch: dict) -> torch.Tensor:
    """[B, T + C, F', h, w]: the first-frame mask, then the latents of the first frame and
    black frames after it. Deterministic (the pipeline encodes with the posterior's mode)."""
    pixels = batch["pixel_values"]  # [B, 3, F, H, W] in [-1, 1]
    video = torch.cat([pixels[:, :, :1], torch.zeros_like(pixels[:, :, 1:])], dim=2)
    z = module.vae.encode(video.to(module.vae.dtype)).latent_dist.mode()  # [B, C, F', h, w]
    latents = normalize_latents(module.vae, z)
    b, _, f = pixels.shape[:3]
    mask = first_frame_mask(b, f, *latents.shape[-2:], vae_temporal_factor(module.vae))
    return torch.cat([mask.to(latents), latents], dim=1)
