"""Which samples every rank and worker reads in an epoch: a pure function of the shard sizes,
the seed and the epoch number.

Why not webdataset's ``split_by_node``/``split_by_worker``: they hand out whole shards, so ranks
with smaller or fewer shards run out first and DDP hangs at the epoch's end, and they keep no
position to resume from. Here the epoch's shard sequence (shuffled, datasets repeated by weight)
is treated as one stream of samples and cut into equal contiguous ranges, one per *slot*
(rank × worker). Every slot reads the same number of samples, so every rank runs the same number
of steps, no sample is read twice, and a slot's position is a single number.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Segment:
    """Samples ``[start, start + count)`` of shard number ``shard``."""

    shard: int
    start: int
    count: int


def _fractional(weights: list[float]) -> tuple[list[int], int]:
    fractional = [i for i, w in enumerate(weights) if w - math.floor(w) > 0]
    k = round(sum(weights[i] - math.floor(weights[i]) for i in fractional))
    return fractional, k


def epoch_shards(weights: list[float], seed: int, epoch: int, shuffle: bool) -> list[int]:
    """Shard indices read in ``epoch``: shard i ``floor(weights[i])`` times, plus a seeded draw
    of exactly ``round(sum of fractional parts)`` shards without replacement (weighted by
    their fractional parts, Efraimidis & Spirakis 2006), in a seeded order when ``shuffle``."""
    rng = random.Random(f"shards/{seed}/{epoch}")
    order = [i for i, w in enumerate(weights) for _ in range(math.floor(w))]
    fractional, k = _fractional(weights)
    if k:
        keys = {
            i: rng.random() ** (1.0 / (weights[i] - math.floor(weights[i]))) for i in fractional
        }
        order += sorted(fractional, key=lambda i: -keys[i])[:k]
        order.sort()
    if shuffle:
        rng.shuffle(order)
    return order


def min_epoch_samples(sizes: list[int], weights: list[float]) -> int:
    """The fewest samples any epoch's shard list can hold (its fractional draw may vary)."""
    whole = sum(math.floor(w) * s for w, s in zip(weights, sizes, strict=True))
    fractional, k = _fractional(weights)
    return whole + sum(sorted(sizes[i] for i in fractional)[:k])


def cut(order: list[int], sizes: list[int], slots: int) -> list[list[Segment]]:
    """Cut the concatenated samples of ``order`` into ``slots`` ranges of equal length.

    Returns the segments of each slot. The last ``total % slots`` samples are left
    out of this epoch; the next epoch's order is different, so they are not always the same.
    """
    total = sum(sizes[i] for i in order)
    length = total // slots
    plans: list[list[Segment]] = [[] for _ in range(slots)]
    slot, need = 0, length
    for shard in order:
        pos, left = 0, sizes[shard]
        while left > 0 and slot < slots:
            take = min(left, need)
            if take > 0:
                plans[slot].append(Segment(shard, pos, take))
            pos, left, need = pos + take, left - take, need - take
            if need == 0:
                slot, need = slot + 1, length
        if slot >= slots:
            break
    return plans


def resampled(
    sizes: list[int], weights: list[float], seed: int, epoch: int, slot: int, length: int
) -> list[Segment]:
    """``length`` samples of whole shards drawn with replacement, shard i with probability
    ∝ ``weights[i] * sizes[i]`` (so each dataset contributes in proportion to weight × size),
    seeded by (seed, epoch, slot); the last shard is cut short."""
    rng = random.Random(f"resampled/{seed}/{epoch}/{slot}")
    mass = [w * s for w, s in zip(weights, sizes, strict=True)]
    if sum(mass) <= 0:
        raise ValueError("data: every shard is empty or has weight 0")
    segments: list[Segment] = []
    need = length
    while need > 0:
        shard = rng.choices(range(len(sizes)), weights=mass)[0]
        take = min(sizes[shard], need)
        if take > 0:
            segments.append(Segment(shard, 0, take))
            need -= take
    return segments


def seek(segments: list[Segment], offset: int) -> tuple[int, int]:
    """(segment index, samples to skip inside it) for sample ``offset`` of a slot's range."""
    for i, seg in enumerate(segments):
        if offset < seg.count:
            return i, offset
        offset -= seg.count
    return len(segments), 0
