"""Global batch semantics: the config fixes samples per optimizer step; the split is derived.

A run moved from 1 GPU to 4 nodes x 8 GPUs keeps its global batch, so it trains the same
model; only the per-device micro-batch and gradient accumulation change. The learning rate is
never changed behind the user's back: scaling it is a setting, and the result is reported.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

from train.errors import ConfigError

LrScaling = Literal["none", "linear", "sqrt"]


@dataclass(frozen=True)
class BatchPlan:
    global_size: int
    per_device: int
    accumulation: int
    world_size: int
    sample_pixels: int | None = None  # frames x height x width of one sample, where budgeted
    max_pixels: int | None = None

    def describe(self) -> str:
        text = (
            f"global batch {self.global_size} = {self.per_device} per device x "
            f"{self.world_size} devices x {self.accumulation} accumulation steps"
        )
        if self.sample_pixels and self.max_pixels:
            text += (
                f" ({self.per_device * self.sample_pixels:,} of batch.max_pixels_per_device="
                f"{self.max_pixels:,} frame pixels per micro-batch)"
            )
        return text


def plan_batch(
    global_size: int | None,
    world_size: int,
    max_per_device: int | None,
    data_batch_size: int,
    accumulation: int,
) -> BatchPlan:
    """Split ``global_size`` over ``world_size`` devices with the fewest accumulation steps
    that keep the micro-batch within ``max_per_device``; without a global size, the
    per-device samples per step (``data_batch_size`` x ``accumulation``) stand and are split
    the same way, so the global batch follows from the per-device settings."""
    if global_size is None:
        per_rank = data_batch_size * accumulation
        if max_per_device is None or data_batch_size <= max_per_device:
            return BatchPlan(per_rank * world_size, data_batch_size, accumulation, world_size)
        return _split(per_rank * world_size, per_rank, max_per_device, world_size)
    if global_size <= 0 or global_size % world_size:
        lower = max(world_size, global_size - global_size % world_size)
        raise ConfigError(
            f"batch.global_size={global_size} does not split evenly over {world_size} devices "
            f"(trainer.devices x trainer.num_nodes); use a multiple of {world_size}, e.g. "
            f"{lower} or {lower + world_size}"
        )
    return _split(global_size, global_size // world_size, max_per_device, world_size)


def _split(global_size: int, per_rank: int, cap: int | None, world_size: int) -> BatchPlan:
    cap = cap or per_rank
    for steps in range(1, per_rank + 1):
        if per_rank % steps == 0 and per_rank // steps <= cap:
            return BatchPlan(global_size, per_rank // steps, steps, world_size)
    raise AssertionError("unreachable: one sample per micro-batch always fits")


def sample_pixels(data: Mapping[str, Any]) -> int:
    """Frames x height x width of one training sample: a clip's ``data.video.num_frames``
    (an image counts one) at ``data.resolution`` squared (aspect buckets keep about that area)."""
    video = data.get("video") or {}
    frames = int(video.get("num_frames") or 1) if video else 1
    return frames * int(data.get("resolution", 256)) ** 2


def pixel_cap(max_pixels: int | None, data: Mapping[str, Any]) -> int | None:
    """The most samples per micro-batch whose frames x pixels stay within ``max_pixels``, the
    measure a denoiser's activations grow with (a clip of 17 frames costs about what 17 images
    do); None without a budget."""
    if max_pixels is None:
        return None
    one = sample_pixels(data)
    if max_pixels < one:
        frames = (data.get("video") or {}).get("num_frames") or 1
        raise ConfigError(
            f"batch.max_pixels_per_device={max_pixels:,} is below one sample's {one:,} frame "
            f"pixels ({frames} frames x data.resolution={data.get('resolution')} squared): raise "
            "it, sample fewer frames (data.video.num_frames) or lower data.resolution; "
            "model.backbone.gradient_checkpointing=true makes each pixel cost less memory"
        )
    return max_pixels // one


def plan_for(
    batch: Mapping[str, Any], data: Mapping[str, Any], world_size: int, accumulation: int
) -> BatchPlan:
    """:func:`plan_batch` under both caps the config may set: ``batch.max_per_device`` samples
    and ``batch.max_pixels_per_device`` frame pixels per micro-batch."""
    max_pixels = batch.get("max_pixels_per_device")
    caps = [c for c in (batch.get("max_per_device"), pixel_cap(max_pixels, data)) if c]
    plan = plan_batch(batch.get("global_size"), world_size, min(caps, default=None),
                      int(data.get("batch_size", 1)), accumulation)  # fmt: skip
    if max_pixels is None:
        return plan
    return replace(plan, sample_pixels=sample_pixels(data), max_pixels=int(max_pixels))


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
