"""Callbacks for what Lightning does not cover: previews, export, lineage, grad norms, skips."""

from __future__ import annotations

import contextlib
import copy
import logging
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities import grad_norm

from train.callbacks.ema import EMA
from train.callbacks.guards import TrainingDiverged, weights_finite
from train.callbacks.preemption import preempted
from train.distributed.sharding import (
    full_state_dict,
    is_fsdp,
    is_fsdp2,
    is_sharded,
    local_parts,
)
from train.errors import ConfigError
from train.tasks import pipelines
from train.tasks.clips import Clips
from train.tracking.lineage import finetune_tags
from train.tracking.tags import (
    MLFLOW_RUN_ID_KEY,
    log_artifact,
    mlflow_loggers,
    register_export,
    registered_version,
)

log = logging.getLogger(__name__)


class GradNormMonitor(L.Callback):
    """Logs the total L2 norm of the gradients (before clipping) as ``train/grad_norm``.

    Under FSDP each rank holds a slice of the gradients, so the squares are summed over the
    ranks that split them; DeepSpeed keeps gradients inside its engine and reports the norm it
    clipped with.
    """

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self._due(trainer) or isinstance(trainer.strategy, DeepSpeedStrategy):
            return
        if is_fsdp(trainer.strategy):
            group = trainer.strategy.shard_group if is_fsdp2(trainer.strategy) else None
            pl_module.log("train/grad_norm", sharded_grad_norm(pl_module, group))
            return
        total = grad_norm(pl_module, norm_type=2).get("grad_2.0_norm_total")
        if total is not None:
            pl_module.log("train/grad_norm", total)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if isinstance(trainer.strategy, DeepSpeedStrategy) and self._due(trainer, after=True):
            norm = trainer.strategy.deepspeed_engine.get_global_grad_norm()
            if norm is not None:
                pl_module.log("train/grad_norm", float(norm))

    @staticmethod
    def _due(trainer, after: bool = False) -> bool:
        step = trainer.global_step - (1 if after else 0)
        return step % max(trainer.log_every_n_steps, 1) == 0


def sharded_grad_norm(pl_module: L.LightningModule, group=None) -> torch.Tensor:
    """L2 norm of gradients split into disjoint slices over the ranks of ``group`` (FSDP: all
    ranks; FSDP2: its shard group, as HSDP's replicas hold equal slices)."""
    grads = local_parts([p.grad for p in pl_module.parameters() if p.grad is not None])
    squares = [g.detach().float().pow(2).sum() for g in grads]
    total = torch.stack(squares).sum() if squares else torch.zeros((), device=pl_module.device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(total, group=group)
    return total.sqrt()


class SamplePreview(L.Callback):
    """Every `every_n_steps` and at the end, writes `pl_module.preview(...)` as a PNG and logs it
    (a video model's: a frame strip PNG, an mp4 and a GIF).

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

    def setup(self, trainer, pl_module, stage: str) -> None:
        check_whole_weights(trainer, pl_module)

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
        if not preempted(trainer):
            self._write(trainer, pl_module, "final.png")

    def _write(self, trainer, pl_module, name: str) -> None:
        # Every rank enters: gathering sharded or EMA weights is a collective.
        if self._batch is None:
            return
        extra = output_weights(trainer, pl_module)
        if not trainer.is_global_zero:
            return
        with text_weights(trainer, pl_module):
            grid = pl_module.preview(self._batch, self.prompts, **self.kwargs, **extra)
        path = Path(trainer.default_root_dir) / self.dirname / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(grid, Clips):  # a video model's: the strip, and .mp4 and .gif beside it
            written = grid.save(path)
        else:
            grid.save(path)
            written = [path]
        self.last_path = path
        for file in written:
            log_artifact(trainer, file, self.dirname)


class ExportOnTrainEnd(L.Callback):
    """Exports the trained model (diffusers layout, safetensors) and logs it to MLflow.

    The weights are whole whatever the strategy (gathered from ZeRO-3/FSDP shards) and the EMA
    ones when the EMA callback is on; only global rank 0 writes.
    """

    def __init__(
        self,
        dirname: str = "export",
        log_to_mlflow: bool = True,
        register_as: str | None = None,
        lora_dirname: str = "lora",
        kohya_dirname: str | None = "lora_kohya",
    ) -> None:
        self.dirname, self.log_to_mlflow, self.register_as = dirname, log_to_mlflow, register_as
        self.lora_dirname, self.kohya_dirname = lora_dirname, kohya_dirname
        self.path: Path | None = None
        self.lora_path: Path | None = None
        self.kohya_path: Path | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        check_whole_weights(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if preempted(trainer):
            return  # the requeued job resumes and exports at its real end
        if not weights_finite(trainer, pl_module):
            raise TrainingDiverged("the weights hold NaN/Inf at the end of training: no export "
                                   "is written from them")  # fmt: skip
        extra = output_weights(trainer, pl_module)
        if not trainer.is_global_zero:
            return
        root = Path(trainer.default_root_dir)
        with text_weights(trainer, pl_module):
            self.path = pl_module.export(root / self.dirname, **extra)
            lineage = finetune_tags(pl_module)
            self._publish(trainer, self.path, self.dirname, self.register_as, "diffusers",
                          lineage)  # fmt: skip
            if getattr(getattr(pl_module, "backbone", None), "adapter", None) is not None:
                self._export_adapter(trainer, pl_module, root, extra.get("model"), lineage)

    def _export_adapter(self, trainer, pl_module, root: Path, model: Any, lineage: dict) -> None:
        """The LoRA files beside the merged export, in each format the adapter has; the
        diffusers one registered as `<register_as>-lora`."""
        problem = pipelines.lora_format_problem(pl_module, model)
        if problem is None:
            self.lora_path = pipelines.export_lora(pl_module, root / self.lora_dirname, model)
            name = self.register_as and f"{self.register_as}-lora"
            self._publish(trainer, self.lora_path, self.lora_dirname, name, "diffusers-lora",
                          lineage)  # fmt: skip
        else:  # said once, so that a missing folder is not a surprise
            log.info("no %s/ (diffusers' LoRA format): %s; %s/ holds the LoRA merged",
                     self.lora_dirname, problem, self.dirname)  # fmt: skip
        if self.kohya_dirname and pipelines.kohya_format_problem(pl_module, model) is None:
            self.kohya_path = pipelines.export_kohya(pl_module, root / self.kohya_dirname, model)
            self._publish(trainer, self.kohya_path, self.kohya_dirname, None, "kohya", lineage)

    def _publish(self, trainer, path: Path, dirname: str, register_as: str | None, fmt: str,
                 tags: dict) -> None:  # fmt: skip
        """Log `path` to MLflow and register it as a version of `register_as` (when set)."""
        if not self.log_to_mlflow:
            return
        # One artifact path per training end: a resumed run uploads beside, never over, the
        # export an earlier registered version points at (registered versions are immutable).
        artifact = f"{dirname}/step_{trainer.global_step:07d}"
        if register_as and registered_version(trainer, register_as, artifact):
            return  # this very export (same run, same step) is logged and registered
        log_artifact(trainer, path, artifact)
        if register_as:
            register_export(trainer, register_as, artifact, fmt, tags)


def check_whole_weights(trainer: L.Trainer, pl_module: L.LightningModule) -> None:
    """Refuse, before training, a sharded strategy for a module whose weights we cannot gather
    (rank 0 alone would run a forward over shards and hang)."""
    if is_sharded(trainer.strategy) and not hasattr(pl_module, "backbone"):
        raise ConfigError(
            f"{type(pl_module).__name__} cannot write previews or exports under "
            f"{type(trainer.strategy).__name__} with sharded parameters; use strategy=ddp, "
            "deepspeed_zero1 or deepspeed_zero2"
        )


def output_weights(trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
    """Collective. The keyword arguments (``model=``) that make a module's ``export``/``preview``
    use whole weights: EMA when the EMA callback runs, gathered when sharded; empty where the
    live module is whole already, on other ranks, and for modules without a backbone."""
    if not hasattr(pl_module, "backbone") or not needs_whole_state(trainer):
        return {}
    state = whole_state(trainer, pl_module)
    return {"model": pl_module.model_from_state(state)} if trainer.is_global_zero else {}


def active_ema(trainer: L.Trainer) -> EMA | None:
    ema = next((c for c in trainer.callbacks if isinstance(c, EMA)), None)
    return ema if ema is not None and ema.shadow is not None else None


def text_weights(trainer: L.Trainer, pl_module: L.LightningModule) -> AbstractContextManager[None]:
    """Context: a text encoder's adapter holds its EMA weights when the EMA callback runs."""
    ema = active_ema(trainer)
    return ema.text_weights(pl_module) if ema is not None else contextlib.nullcontext()


def needs_whole_state(trainer: L.Trainer) -> bool:
    """Whether outputs need weights other than the live module's (the same on every rank)."""
    return active_ema(trainer) is not None or is_sharded(trainer.strategy)


def whole_state(trainer: L.Trainer, pl_module: L.LightningModule) -> dict | None:
    """Collective: the trainable model's whole state for outputs (EMA if on) on rank 0."""
    ema = active_ema(trainer)
    if ema is not None:
        return ema.full_model_state(trainer, pl_module)
    return full_state_dict(trainer, pl_module.trainable)


class ConfigInCheckpoint(L.Callback):
    """Stores the resolved config in each checkpoint so `ldm-export CKPT` can rebuild the model,
    and the MLflow run id, so a resume from a copied checkpoint continues the same run."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["ldm_config"] = self.config
        for logger in mlflow_loggers(trainer):
            checkpoint[MLFLOW_RUN_ID_KEY] = logger.run_id


def samples_in_batch(batch: dict) -> int:
    """Batch size for Lightning's ThroughputMonitor."""
    return len(batch["key"])
