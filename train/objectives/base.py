"""What every objective hands the training step, and the loss they share."""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F


class Draws(Protocol):
    """Per-sample random draws (`train.tasks.rng.SampleRNG`): one generator per sample."""

    generators: list[torch.Generator]
    device: torch.device

    def randn(self, shape: tuple[int, ...], dtype: torch.dtype = ...) -> torch.Tensor: ...
    def rand(self) -> torch.Tensor: ...
    def randint(self, high: int) -> torch.Tensor: ...


class Noised(NamedTuple):
    """One micro-batch after the forward process: what the backbone sees and must predict."""

    x_t: torch.Tensor  # [B, C, h, w] (or [B, C, F, h, w]) noisy latents
    timesteps: torch.Tensor  # [B] on the 0..num_train_timesteps scale the pipelines use
    target: torch.Tensor  # like x_t
    weights: torch.Tensor  # [B] loss weight per sample


def weighted_mse(
    prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Weighted MSE over all but the batch dimension (Ho et al. 2020, simple loss)."""
    return (per_sample_mse(prediction, target) * weights).mean()


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample [B], in float32 (Ho et al. 2020)."""
    per_element = F.mse_loss(prediction.float(), target.float(), reduction="none")
    return per_element.mean(dim=tuple(range(1, per_element.ndim)))


def stratified_levels(rows: torch.Tensor, bins: int) -> torch.Tensor:
    """Fixed noise levels u = (i + 0.5) / bins for validation, bin i = row mod bins, for rows
    that number the validation samples (torchtitan's Flux validation, the MLPerf scheme)."""
    return ((rows % bins).double() + 0.5) / bins
