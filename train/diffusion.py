"""Diffusion math as small pure functions: noising, training targets and loss weights.

Noising and velocity come from diffusers' scheduler so training and diffusers' samplers share one
definition of the noise schedule; what diffusers does not provide (loss weights) is written here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler


def sample_timesteps(
    scheduler: DDPMScheduler, batch_size: int, device: torch.device, generator=None
) -> torch.Tensor:
    """Uniform discrete timesteps, as in DDPM training (Ho et al. 2020)."""
    n = scheduler.config.num_train_timesteps
    return torch.randint(0, n, (batch_size,), device=device, generator=generator, dtype=torch.long)


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
        f"noise_scheduler.prediction_type={kind!r} is not supported for training; "
        "use 'epsilon' or 'v_prediction'"
    )


def snr(scheduler: DDPMScheduler, t: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio a_t / (1 - a_t) of the DDPM schedule (Kingma et al. 2021)."""
    alphas = scheduler.alphas_cumprod.to(device=t.device, dtype=torch.float32)[t]
    return alphas / (1.0 - alphas)


def min_snr_weights(scheduler: DDPMScheduler, t: torch.Tensor, gamma: float | None) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023), in the form for the configured target.

    For epsilon targets the weight is min(snr, g) / snr, for v targets min(snr, g) / (snr + 1);
    gamma=None gives uniform weights.
    """
    if gamma is None:
        return torch.ones_like(t, dtype=torch.float32)
    s = snr(scheduler, t)
    clipped = torch.clamp(s, max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (s + 1.0)
    return clipped / s


def diffusion_loss(
    prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Weighted MSE over all but the batch dimension (Ho et al. 2020, simple loss)."""
    # prediction, target: [B, C, h, w]; weights: [B]
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none")
    per_sample = per_sample.mean(dim=tuple(range(1, per_sample.ndim)))
    return (per_sample * weights).mean()


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, var) || N(0, I)) per sample, summed over latent dims (Kingma & Welling 2014)."""
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)
    return kl.sum(dim=tuple(range(1, kl.ndim)))
