"""Global batch semantics: the config fixes samples per optimizer step; the split is derived.

A run moved from 1 GPU to 4 nodes x 8 GPUs keeps its global batch, so it trains the same
model; only the per-device micro-batch and gradient accumulation change. The learning rate is
never changed behind the user's back: scaling it is a setting, and the result is reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from train.errors import ConfigError

LrScaling = Literal["none", "linear", "sqrt"]


@dataclass(frozen=True)
class BatchPlan:
    global_size: int
    per_device: int
    accumulation: int
    world_size: int

    def describe(self) -> str:
        return (
            f"global batch {self.global_size} = {self.per_device} per device x "
            f"{self.world_size} devices x {self.accumulation} accumulation steps"
        )


def plan_batch(
    global_size: int | None,
    world_size: int,
    max_per_device: int | None,
    data_batch_size: int,
    accumulation: int,
) -> BatchPlan:
    """Split ``global_size`` over ``world_size`` devices with the fewest accumulation steps
    that keep the micro-batch within ``max_per_device``; without a global size, the
    per-device settings stand and the global batch follows from them."""
    if global_size is None:
        total = data_batch_size * world_size * accumulation
        return BatchPlan(total, data_batch_size, accumulation, world_size)
    if global_size <= 0 or global_size % world_size:
        lower = max(world_size, global_size - global_size % world_size)
        raise ConfigError(
            f"batch.global_size={global_size} does not split evenly over {world_size} devices "
            f"(trainer.devices x trainer.num_nodes); use a multiple of {world_size}, e.g. "
            f"{lower} or {lower + world_size}"
        )
    per_rank = global_size // world_size
    cap = max_per_device or per_rank
    for steps in range(1, per_rank + 1):
        if per_rank % steps == 0 and per_rank // steps <= cap:
            return BatchPlan(global_size, per_rank // steps, steps, world_size)
    raise AssertionError("unreachable: one sample per micro-batch always fits")


def scaled_lr(lr: float, rule: LrScaling, global_size: int, reference_size: int | None) -> float:
    """The learning rate for ``global_size`` under an explicit rule: linear (Goyal et al. 2017)
    or square-root (Krizhevsky 2014) in the ratio to ``reference_size``."""
    if rule not in ("none", "linear", "sqrt"):
        raise ConfigError(f"batch.lr_scaling={rule!r}: use none, linear or sqrt")
    if rule == "none":
        return lr
    if not reference_size or reference_size <= 0:
        raise ConfigError(
            f"batch.lr_scaling={rule} needs batch.reference_size: the global batch that "
            "model.optimizer.lr was tuned for"
        )
    ratio = global_size / reference_size
    return lr * (ratio if rule == "linear" else math.sqrt(ratio))
