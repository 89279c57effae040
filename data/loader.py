"""A DataLoader whose position (epoch, batches consumed) Lightning saves in checkpoints.

Lightning calls ``state_dict()``/``load_state_dict()`` on any train dataloader that has them
and stores the result with the fit loop. Lightning fetches one batch ahead of the training step,
so the position counts batches *consumed* (``mark_consumed``, called by the data module's
``on_before_batch_transfer`` hook when a batch reaches the step), not batches fetched.
"""

from __future__ import annotations

import signal
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import DataLoader

from data.stream import ShardStream

POSITION_KEY = "data_position"

# Lightning warns that len() of an IterableDataset may be wrong with workers; ours is exact
# (every worker reads an equal, disjoint range).
warnings.filterwarnings("ignore", message=".*`IterableDataset` has `__len__` defined")


class StatefulLoader(DataLoader):
    """Batches of a :class:`ShardStream` with ``batch[POSITION_KEY] = (epoch, index)``."""

    def __init__(
        self,
        stream: ShardStream,
        num_workers: int = 0,
        epoch_fn: Callable[[], int] | None = None,
        prefetch_factor: int | None = None,
    ) -> None:
        super().__init__(
            stream,
            batch_size=None,
            num_workers=num_workers,
            # Workers are started per epoch so they receive the epoch and start position.
            persistent_workers=False,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
            worker_init_fn=ignore_terminate,
        )
        self.stream = stream
        self.epoch_fn = epoch_fn
        self._epoch = -1
        self._consumed = 0
        self._resume: dict[str, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        epoch = self.epoch_fn() if self.epoch_fn is not None else self._epoch + 1
        start = 0
        if self._resume is not None and self._resume["epoch"] == epoch:
            start = self._resume["consumed"]
        self._resume = None
        self._epoch, self._consumed = epoch, start
        self.stream.epoch, self.stream.start_batch = epoch, start
        for index, batch in enumerate(super().__iter__(), start=start):
            batch[POSITION_KEY] = (epoch, index)
            yield batch

    def mark_consumed(self, position: tuple[int, int]) -> None:
        epoch, index = position
        self._epoch, self._consumed = int(epoch), int(index) + 1

    def state_dict(self) -> dict[str, Any]:
        s = self.stream
        n = max(1, s.num_workers)
        return {
            "epoch": self._epoch,
            "consumed": self._consumed,
            # Derived, for people reading checkpoints: batches each worker's range has given.
            "batches_per_worker": [len(range(w, self._consumed, n)) for w in range(n)],
            "num_workers": self.stream.num_workers,
            "world_size": s.world_size,
            "num_shards": len(s.shards),
            "seed": s.seed,
            "batch_size": s.batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        problem = position_mismatch(state, self.state_dict())
        if problem:
            raise ValueError(problem)
        consumed = int(state["consumed"])
        epoch = int(state["epoch"])
        if consumed >= len(self.stream):  # saved at the end of an epoch: start the next one
            epoch, consumed = epoch + 1, 0
        self._resume = {"epoch": epoch, "consumed": consumed}
        self._epoch, self._consumed = epoch, consumed


def ignore_terminate(worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM: a stop signal sent to the process group (Kubernetes,
    `docker stop`) would otherwise kill them and the step with them, before the training process
    saves its checkpoint (train.callbacks.preemption.CheckpointOnTerminate). Workers still end with
    their
    parent: the loader shuts them down, and they exit when the parent is gone."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# What a saved data position depends on, and the setting that decides each.
POSITION_SETTINGS = {
    "num_workers": "data.num_workers",
    "world_size": "trainer.devices x trainer.num_nodes",
    "num_shards": "data.urls",
    "seed": "seed",
    "batch_size": "data.batch_size (per device, derived from batch.global_size when set)",
}


def position_mismatch(saved: dict[str, Any], mine: dict[str, Any]) -> str | None:
    """Why a data position saved as `saved` cannot be resumed exactly by a loader whose
    `state_dict()` is `mine` (only keys both have are compared), or None."""
    for key, setting in POSITION_SETTINGS.items():
        if key in saved and key in mine and saved[key] != mine[key]:
            return (
                f"cannot resume the data position exactly: the checkpoint was written with "
                f"{key}={saved[key]} and this run has {key}={mine[key]}; set the same value "
                f"({setting}) or start a new run with run_name=<new name>"
            )
    return None
