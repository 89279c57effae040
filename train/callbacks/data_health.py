"""Data-loading health per rank: samples/s, time waiting for data, skipped samples."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch

from data.transforms import ALL_REASONS


class DataHealthMonitor(L.Callback):
    """Logs, every ``every_n_steps``, for each rank r: ``data/rank{r}/samples_per_sec`` and
    ``data/rank{r}/wait_ms`` (mean time per step between the end of a step and the start of the
    next: the wait for the loader), and over all ranks ``data/samples_per_sec`` (sum),
    ``data/wait_ms`` (slowest rank) and ``data/skipped_<reason>`` (totals since the start).

    Skip counts come from the data workers inside each batch (``batch["skipped"]``): workers are
    separate processes. All ranks gather at the same steps, so no rank waits on another.
    """

    def __init__(self, every_n_steps: int = 50) -> None:
        self.every_n_steps = max(1, every_n_steps)
        self.totals = dict.fromkeys(ALL_REASONS, 0)
        # Every rank's skip totals, as of the last report or the loaded checkpoint.
        self._per_rank: list[list[int]] | None = None
        self._reset_window()
        self._last_end: float | None = None

    def _reset_window(self) -> None:
        self._wait, self._steps, self._samples = 0.0, 0, 0
        self._window_start = time.perf_counter()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._per_rank is not None and trainer.global_rank < len(self._per_rank):
            row = self._per_rank[trainer.global_rank]
            self.totals = dict(zip(ALL_REASONS, row, strict=True))
        self._reset_window()
        self._last_end = None

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._last_end is not None:
            self._wait += now - self._last_end
        self._steps += 1
        self._samples += len(batch["key"]) if "key" in batch else 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch: Any, batch_idx: int) -> None:
        for reason, n in (batch.get("skipped") or {}).items():
            self.totals[reason] = self.totals.get(reason, 0) + int(n)
        if trainer.global_step % self.every_n_steps == 0:
            self._report(trainer, pl_module)
        self._last_end = time.perf_counter()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._steps:
            self._report(trainer, pl_module)

    def _gather(self, pl_module: L.LightningModule) -> torch.Tensor:
        elapsed = max(time.perf_counter() - self._window_start, 1e-9)
        wait_ms = 1000.0 * self._wait / max(1, self._steps)
        row = [self._samples / elapsed, wait_ms, *(self.totals[r] for r in ALL_REASONS)]
        values = torch.tensor(row, dtype=torch.float64, device=pl_module.device)
        gathered = pl_module.all_gather(values)
        return gathered.reshape(-1, len(row)).cpu()  # [world, 2 + reasons]

    def _report(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        table = self._gather(pl_module)
        self._per_rank = table[:, 2:].long().tolist()
        self._reset_window()
        if not trainer.is_global_zero or not trainer.loggers:
            return
        metrics = {
            "data/samples_per_sec": float(table[:, 0].sum()),
            "data/wait_ms": float(table[:, 1].max()),
        }
        for rank, (rate, wait) in enumerate(table[:, :2].tolist()):
            metrics[f"data/rank{rank}/samples_per_sec"] = rate
            metrics[f"data/rank{rank}/wait_ms"] = wait
        for i, reason in enumerate(ALL_REASONS):
            metrics[f"data/skipped_{reason}"] = float(table[:, 2 + i].sum())
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        # Every rank's totals, since the checkpoint is rank 0's.
        return {"reasons": list(ALL_REASONS), "per_rank": self._per_rank}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        reasons, rows = state_dict.get("reasons"), state_dict.get("per_rank")
        if reasons and rows:
            # By name: a checkpoint written before a reason was added restores the others.
            self._per_rank = [[dict(zip(reasons, row, strict=True)).get(r, 0) for r in ALL_REASONS]
                              for row in rows]  # fmt: skip
