"""The autoencoder's (stage 1) regulariser as a pure function."""

from __future__ import annotations

import torch


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, var) || N(0, I)) per sample, summed over latent dims (Kingma & Welling 2014)."""
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)
    return kl.sum(dim=tuple(range(1, kl.ndim)))
