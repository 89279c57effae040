"""The per-worker batch stream: reads a slot's sample range (``data.plan``), shuffles it in
windows, decodes and batches it, and can start at any batch of the epoch.

Every random choice (window order, crops, flips, caption choice and dropout) is seeded from
(seed, epoch, slot, position) rather than drawn from a running generator, so a worker that
starts at batch k of an epoch produces exactly what an uninterrupted worker produces there.
A window of ``window`` raw samples (the shuffle buffer) is held in memory, never more.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from data import plan
from data.sources import iter_raw_samples
from data.transforms import SkipCounter

Raw = dict[str, Any]


def _repeat(batch: dict[str, Any]) -> dict[str, Any]:
    """A batch sent again to fill an empty one: its skips were already counted once."""
    return batch | {"skipped": dict.fromkeys(batch["skipped"], 0)}


class ShardStream(IterableDataset):
    """Batches of one rank. ``epoch`` and ``start_batch`` are set by the loader before each
    iteration; ``len()`` is the number of batches this rank yields per epoch."""

    def __init__(
        self,
        shards: list[str],
        sizes: list[int],
        weights: list[float],
        batch_size: int,
        decoder: Callable[[Raw, random.Random, Any], dict[str, Any] | None],
        collate: Callable[[list[dict[str, Any]], SkipCounter], dict[str, Any]],
        counter: SkipCounter,
        seed: int = 0,
        shuffle: bool = True,
        window: int = 1000,
        resampled: bool = False,
        steps_per_epoch: int | None = None,
        bucket_of: Callable[[Raw], Any] | None = None,
    ) -> None:
        super().__init__()
        if resampled and not steps_per_epoch:
            raise ValueError("data.steps_per_epoch must be set when data.resampled=true")
        self.shards, self.sizes, self.weights = shards, sizes, weights
        self.batch_size = batch_size
        self.decoder, self.collate, self.counter = decoder, collate, counter
        self.seed, self.shuffle, self.resampled = seed, shuffle, resampled
        self.window = max(batch_size, window // batch_size * batch_size)
        self.steps_per_epoch = steps_per_epoch
        self.bucket_of = bucket_of
        self.rank, self.world_size, self.num_workers = 0, 1, 1
        self.epoch, self.start_batch = 0, 0

    def configure(self, rank: int, world_size: int, num_workers: int) -> None:
        self.rank, self.world_size, self.num_workers = rank, world_size, max(1, num_workers)

    @property
    def slots(self) -> int:
        return self.world_size * self.num_workers

    def batches_per_worker(self) -> int:
        if self.resampled:
            return int(self.steps_per_epoch) // self.num_workers  # type: ignore[arg-type]
        total = plan.min_epoch_samples(self.sizes, self.weights)
        return total // self.slots // self.batch_size

    def __len__(self) -> int:
        return self.batches_per_worker() * self.num_workers

    def _segments(self, slot: int) -> list[plan.Segment]:
        length = self.batches_per_worker() * self.batch_size
        if self.resampled:
            return plan.resampled(self.sizes, self.weights, self.seed, self.epoch, slot, length)
        order = plan.epoch_shards(self.weights, self.seed, self.epoch, self.shuffle)
        per_slot = plan.cut(order, self.sizes, self.slots)
        segments, kept = [], 0
        for seg in per_slot[slot]:  # the range may be longer than whole batches need
            take = min(seg.count, length - kept)
            if take > 0:
                segments.append(plan.Segment(seg.shard, seg.start, take))
            kept += take
        return segments

    def _first_batch(self, logical: int) -> int:
        # The loader's round robin hands global batch g to worker g % n: this worker's first
        # batch at or after start_batch.
        n, g = self.num_workers, self.start_batch
        first = g + (logical - g) % n
        return first // n

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        # Workers are rotated so that physical worker 0 (whose batch the loader takes first)
        # plays the worker that owned batch start_batch.
        logical = (physical + self.start_batch) % self.num_workers
        slot = self.rank * self.num_workers + logical
        first = self._first_batch(logical)
        total = self.batches_per_worker()
        if first >= total:
            return
        yield from self._batches(slot, first, total)

    def _raw(self, segments: list[plan.Segment], offset: int) -> Iterator[Raw]:
        index, skip = plan.seek(segments, offset)
        for seg in segments[index:]:
            url = self.shards[seg.shard]
            samples = iter_raw_samples(url, self.counter.tar_handler)
            yield from itertools.islice(samples, seg.start + skip, seg.start + seg.count)
            skip = 0

    def _chunks(self, slot: int, window: int, raw: list[Raw]) -> list[tuple[list, Any]]:
        """The window's samples (with their slot position) cut into batches, each with the
        bucket its samples are resized to (None without buckets)."""
        base = window * self.window
        items = [(pos, r, None) for pos, r in enumerate(raw, start=base)]
        if self.shuffle:
            random.Random(f"window/{self.seed}/{self.epoch}/{slot}/{window}").shuffle(items)
        bs = self.batch_size
        if self.bucket_of is None:
            return [(items[i : i + bs], None) for i in range(0, len(items), bs)]
        # Batches of one aspect bucket: group after shuffling, then shuffle the batch order. A
        # batch at a boundary between two buckets takes its majority bucket (at most one such
        # batch per bucket and window), so the number of batches never depends on the content.
        items = sorted(((pos, r, self.bucket_of(r)) for pos, r, _ in items), key=lambda it: it[2])
        chunks = []
        for i in range(0, len(items), bs):
            chunk = items[i : i + bs]
            chunks.append((chunk, Counter(b for _, _, b in chunk).most_common(1)[0][0]))
        if self.shuffle:
            random.Random(f"batches/{self.seed}/{self.epoch}/{slot}/{window}").shuffle(chunks)
        return chunks

    def _batches(self, slot: int, first: int, total: int) -> Iterator[dict[str, Any]]:
        per_window = self.window // self.batch_size
        window = first // per_window
        raw_iter = self._raw(self._segments(slot), window * self.window)
        produced, pending, last = first, 0, None
        while produced < total:
            size = min(self.window, (total - window * per_window) * self.batch_size)
            chunks = self._chunks(slot, window, list(itertools.islice(raw_iter, size)))
            n_chunks = min(per_window, total - window * per_window)
            for j in range(produced - window * per_window, n_chunks):
                chunk, bucket = chunks[j] if j < len(chunks) else ([], None)
                batch = self._decode(slot, chunk, bucket)
                produced += 1
                if batch is None:
                    pending += 1  # filled with the next good batch: the count never changes
                    continue
                yield batch
                for _ in range(pending):
                    yield _repeat(batch)
                pending, last = 0, batch
            window += 1
        if pending:
            if last is None:
                raise RuntimeError(
                    f"data: every sample of the last {pending} batches of slot {slot} was "
                    "skipped or missing; check the shards with `ldm-data validate`"
                )
            for _ in range(pending):
                # The skips of those last batches' samples, counted once (by the first repeat).
                yield _repeat(last) | {"skipped": self.counter.take()}

    def _decode(self, slot: int, chunk: list, bucket: Any) -> dict[str, Any] | None:
        samples = []
        for pos, raw, _ in chunk:
            rng = random.Random(f"sample/{self.seed}/{self.epoch}/{slot}/{pos}")
            sample = self.decoder(raw, rng, bucket)
            if sample is not None:
                samples.append(sample)
        if not samples:
            return None
        return self.collate(samples, self.counter)
