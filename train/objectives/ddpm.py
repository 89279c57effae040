"""Denoising diffusion (DDPM) as pure functions plus the objective the training step calls.

Noising and velocity come from diffusers' scheduler and SNR from `diffusers.training_utils`, so
training and diffusers' samplers share one definition of the noise schedule; what diffusers does
not provide (min-SNR weights per target, offset noise) is written here.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from train.objectives.base import Draws, Noised


def noisy_latents(
    scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """Forward process q(x_t | x_0) = sqrt(a_t) x0 + sqrt(1 - a_t) eps (Ho et al. 2020)."""
    return scheduler.add_noise(x0, noise, t)


def training_target(
    scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """Epsilon target (Ho et al. 2020) or velocity v = a eps - s x0 (Salimans & Ho 2022)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    raise ValueError(
        f"model.objective.scheduler.prediction_type={kind!r} is not supported for training; "
        "use 'epsilon' or 'v_prediction'"
    )


def min_snr_weights(scheduler: DDPMScheduler, t: torch.Tensor, gamma: float | None) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023), in the form for the configured target.

    For epsilon targets the weight is min(snr, g) / snr, for v targets min(snr, g) / (snr + 1);
    gamma=None gives uniform weights.
    """
    if gamma is None:
        return torch.ones_like(t, dtype=torch.float32)
    s = compute_snr(scheduler, t)
    clipped = torch.clamp(s, max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (s + 1.0)
    return clipped / s


def offset_noise(noise: torch.Tensor, per_channel: torch.Tensor, strength: float) -> torch.Tensor:
    """Noise plus a per-sample, per-channel constant (Guttenberg 2023, "offset noise"), so the
    model can learn images darker or brighter than mid-grey; `per_channel`: [B, C, 1, 1]."""
    return noise + strength * per_channel


class DDPM:
    """The DDPM objective (Ho et al. 2020) on a diffusers `DDPMScheduler`'s noise schedule:
    epsilon or v targets, min-SNR weights, offset noise, and zero terminal SNR through the
    scheduler's own `rescale_betas_zero_snr` (Lin et al. 2024)."""

    kind = "ddpm"
    # What the export ships (and what ldm-sample reconfigures), and what previews sample with.
    export_scheduler = "DDPMScheduler"
    preview_scheduler = "DDIMScheduler"

    def __init__(
        self,
        scheduler: DDPMScheduler,
        snr_gamma: float | None = None,
        offset_noise: float = 0.0,
    ) -> None:
        kind = scheduler.config.prediction_type
        if kind == "flow_prediction" or scheduler.config.get("use_flow_sigmas"):
            # A flow base's scheduler/ (ours: DPM++ with flow sigmas) loads as a DDPMScheduler
            # too; caught here, not at the first training step.
            raise ValueError(
                f"the DDPM objective got a scheduler with prediction_type={kind!r} (flow "
                "sigmas): the base was trained by rectified flow; use "
                "model/objective=flow_pretrained"
            )
        self.scheduler, self.snr_gamma, self.offset = scheduler, snr_gamma, offset_noise

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str, subfolder: str = "scheduler", **kwargs: Any
    ) -> DDPM:
        """The objective of a pretrained DDPM pipeline: its ``scheduler/`` noise schedule and
        prediction type (epsilon for SD 1.5, v for SD 2.x 768); ``kwargs``: the training-only
        settings (min-SNR gamma, offset noise)."""
        where = {"subfolder": subfolder}
        return cls(DDPMScheduler.from_pretrained(pretrained_model_name_or_path, **where), **kwargs)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    def draw(self, x0: torch.Tensor, rng: Draws) -> Noised:
        """Noise and a uniform timestep per sample, all from `rng`."""
        noise = rng.randn(tuple(x0.shape[1:]), x0.dtype)
        t = rng.randint(self.num_train_timesteps)
        if self.offset:
            per_channel = rng.randn((x0.shape[1],) + (1,) * (x0.ndim - 2), x0.dtype)
            noise = offset_noise(noise, per_channel, self.offset)
        return self.noised(x0, noise, t)

    def at_levels(self, x0: torch.Tensor, noise: torch.Tensor, u: torch.Tensor) -> Noised:
        """The forward process at fixed levels u in (0, 1) (validation): t = floor(u * T)."""
        t = (u * self.num_train_timesteps).long().to(x0.device)
        return self.noised(x0, noise, t)

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> Noised:
        x_t = noisy_latents(self.scheduler, x0, noise, t)
        target = training_target(self.scheduler, x0, noise, t)
        return Noised(x_t, t, target, min_snr_weights(self.scheduler, t, self.snr_gamma))

    def scheduler_config(self) -> dict:
        return dict(self.scheduler.config)
