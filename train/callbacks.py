"""Callbacks for what Lightning does not cover: previews, export, lineage, grad norms, skips."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import grad_norm, rank_zero_only

from train.tracking import log_artifact


class GradNormMonitor(L.Callback):
    """Logs the total L2 norm of the gradients before each optimizer step (before clipping)."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step % max(trainer.log_every_n_steps, 1) == 0:
            norms = grad_norm(pl_module, norm_type=2)
            total = norms.get("grad_2.0_norm_total")
            if total is not None:
                pl_module.log("train/grad_norm", total)


class SamplePreview(L.Callback):
    """Every `every_n_steps` and at the end, writes `pl_module.preview(...)` as a PNG and logs it.

    The batch shown is the first training batch, kept on CPU so previews are comparable.
    """

    def __init__(
        self,
        every_n_steps: int = 0,
        prompts: list[str] | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = 4.0,
        seed: int = 0,
        dirname: str = "samples",
    ) -> None:
        self.every_n_steps = every_n_steps
        self.prompts = list(prompts) if prompts else None
        self.kwargs = dict(
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, seed=seed
        )
        self.dirname = dirname
        self._batch: dict | None = None
        self.last_path: Path | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._batch is None:
            self._batch = {
                k: v.cpu() if torch.is_tensor(v) else copy.copy(v) for k, v in batch.items()
            }

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if (
            self.every_n_steps
            and step % self.every_n_steps == 0
            and step < (trainer.max_steps or 0)
        ):
            self._write(trainer, pl_module, f"step_{step:07d}.png")

    def on_train_end(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module, "final.png")

    @rank_zero_only
    def _write(self, trainer, pl_module, name: str) -> None:
        if self._batch is None:
            return
        grid = pl_module.preview(self._batch, self.prompts, **self.kwargs)
        path = Path(trainer.default_root_dir) / self.dirname / name
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        self.last_path = path
        log_artifact(trainer, path, self.dirname)


class ExportOnTrainEnd(L.Callback):
    """Exports the trained model (diffusers layout, safetensors) and logs it to MLflow."""

    def __init__(self, dirname: str = "export", log_to_mlflow: bool = True) -> None:
        self.dirname, self.log_to_mlflow = dirname, log_to_mlflow
        self.path: Path | None = None

    @rank_zero_only
    def on_train_end(self, trainer, pl_module) -> None:
        self.path = pl_module.export(Path(trainer.default_root_dir) / self.dirname)
        if self.log_to_mlflow:
            log_artifact(trainer, self.path, self.dirname)


class ConfigInCheckpoint(L.Callback):
    """Stores the resolved config in each checkpoint so `ldm-export CKPT` can rebuild the model."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["ldm_config"] = self.config


def samples_in_batch(batch: dict) -> int:
    """Batch size for Lightning's ThroughputMonitor."""
    return len(batch["key"])
