"""Validation loss that means the same on any world size: every sample's noise level and noise
come from its key, each rank scores its rows of every batch, sums and counts per level are
reduced over ranks, one number results."""

from __future__ import annotations

import hashlib
from typing import Any

import torch


def rows_of_rank(first_row: int, n: int, rank: int, world_size: int) -> torch.Tensor:
    """Rows [first_row, first_row + n) of the validation stream that this rank scores (every
    rank reads the same batches; row r belongs to rank r mod world_size)."""
    rows = torch.arange(first_row, first_row + n)
    return rows[rows % world_size == rank]


def sample_ids(keys: list[str]) -> torch.Tensor:
    """A stable 62-bit number per sample key [B]: its validation noise seed and level bin."""
    digests = [hashlib.blake2b(str(k).encode(), digest_size=8).digest() for k in keys]
    return torch.tensor([int.from_bytes(d, "little") >> 2 for d in digests], dtype=torch.long)


def select_rows(batch: dict, idx: torch.Tensor, n: int) -> dict:
    """The batch restricted to rows `idx` (tensors and lists with n rows; other values kept)."""
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor) and v.ndim > 0 and len(v) == n:
            out[k] = v[idx.to(v.device)]
        elif isinstance(v, (list, tuple)) and len(v) == n:
            out[k] = [v[i] for i in idx.tolist()]
        else:
            out[k] = v
    return out


class FixedLevelLoss:
    """Per-level sums and counts of per-sample losses over one validation epoch."""

    def __init__(self, bins: int) -> None:
        if bins < 1:
            raise ValueError(f"model.validation_levels={bins}: use 1 or more")
        self.bins = bins
        self.reset("cpu")

    def reset(self, device: torch.device | str) -> None:
        self.sums = torch.zeros(self.bins, dtype=torch.float64, device=device)
        self.counts = torch.zeros(self.bins, dtype=torch.float64, device=device)

    def add(self, losses: torch.Tensor, ids: torch.Tensor) -> None:
        level = (ids % self.bins).to(self.sums.device)
        self.sums.index_add_(0, level, losses.detach().double().to(self.sums.device))
        self.counts.index_add_(0, level, torch.ones_like(level, dtype=torch.float64))

    def reduced(self, strategy: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Sums and counts over all ranks (sum, not mean: ranks may score unequal shares)."""
        both = torch.cat([self.sums, self.counts])
        if strategy is not None and getattr(strategy, "world_size", 1) > 1:
            both = strategy.reduce(both, reduce_op="sum")
        return both[: self.bins], both[self.bins :]
