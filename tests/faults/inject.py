"""Faults injected into real training runs (loaded by `ldm-train` through `+callbacks.inject`
with this folder on PYTHONPATH), and a recorder of what each step consumed."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch


class NaNGradientsAt(L.Callback):
    """After the backward pass of the given steps, one gradient element becomes NaN."""

    def __init__(self, steps: list[int]) -> None:
        self.steps = set(steps)

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step in self.steps:
            grad = next(p.grad for p in pl_module.parameters() if p.grad is not None)
            grad.view(-1)[0] = float("nan")


class NaNWeightsAt(L.Callback):
    """After the optimizer step of the given step, one weight becomes NaN (as a diverging
    optimizer would leave it)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            weight = next(p for p in pl_module.parameters() if p.requires_grad)
            with torch.no_grad():
                weight.view(-1)[0] = float("nan")


class RecordKeys(L.Callback):
    """Appends `<step>\t<sample keys>` for every training batch to `path` (rank 0)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.is_global_zero:
            with self.path.open("a") as f:
                f.write(f"{trainer.global_step}\t{','.join(batch['key'])}\n")


def consumed(path: Path) -> dict[int, str]:
    """Step -> keys; a step run again after a resume keeps its last record."""
    steps: dict[int, str] = {}
    for line in Path(path).read_text().splitlines():
        step, keys = line.split("\t")
        steps[int(step)] = keys
    return steps
