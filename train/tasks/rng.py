"""Per-sample random draws for training that do not depend on how the batch is split.

With one global RNG stream, what noise a sample gets depends on which rank and micro-batch it
landed in (and Lightning seeds every rank alike, so ranks draw the same noise for different
samples). Here each sample's draws come from its own generator seeded by (seed, optimizer step,
row in the global batch), so 1 GPU with gradient accumulation, N GPUs, and a run resumed from a
checkpoint all train on identical noise, timesteps and caption dropout. Per-sample generators
cost O(micro-batch) small kernels and memory, whatever the world size.
"""

from __future__ import annotations

import numpy as np
import torch


def row_offset(rank: int, world_size: int, micro_index: int, micro_batch: int) -> int:
    """First row of this micro-batch in the global batch: micro-batches of all ranks in turn.

    The order (micro-batch, then rank) matches the data plan, where readers are cut from one
    stream in rank order, so row r holds the same sample for any world size x accumulation.
    """
    return (micro_index * world_size + rank) * micro_batch


class SampleRNG:
    """One generator per sample; every draw returns a tensor with a leading batch dimension."""

    def __init__(self, seeds: list[int], device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(s) for s in seeds]

    @classmethod
    def for_rows(
        cls, seed: int, step: int, first_row: int, n: int, device: torch.device | str
    ) -> SampleRNG:
        seeds = [_mix(seed, step, first_row + i) for i in range(n)]
        return cls(seeds, device)

    @staticmethod
    def seed_of(seed: int, step: int, row: int) -> int:
        """The generator seed of one row at one step (as `for_rows` derives it)."""
        return _mix(seed, step, row)

    def randn(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.stack(
            [
                torch.randn(shape, generator=g, device=self.device, dtype=dtype)
                for g in self.generators
            ]
        )

    def rand(self) -> torch.Tensor:
        return torch.cat([torch.rand(1, generator=g, device=self.device) for g in self.generators])

    def randint(self, high: int) -> torch.Tensor:
        return torch.cat(
            [torch.randint(0, high, (1,), generator=g, device=self.device) for g in self.generators]
        )


def _mix(*values: int) -> int:
    """A 63-bit seed from integers; SeedSequence decorrelates neighbouring inputs."""
    # Modulo 2**64: validation seeds use negative steps, which SeedSequence refuses; values
    # that were non-negative (all of training's) map to themselves.
    entropy = [int(v) % (1 << 64) for v in values]
    return int(np.random.SeedSequence(entropy).generate_state(2, np.uint64)[0] >> 1)
