"""The run behind `ldm-train`: validate, build, fit, report. The one place that reads DictConfig."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import get_object, instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import Logger, MLFlowLogger
from omegaconf import DictConfig, OmegaConf, open_dict

from train.callbacks.outputs import (
    ConfigInCheckpoint,
    ExportOnTrainEnd,
    SamplePreview,
    check_whole_weights,
)
from train.callbacks.preemption import raise_if_terminated
from train.cli.export import build_module
from train.config.batching import BatchPlan, plan_for, scaled_lr
from train.config.checks import ConfigError, check_config
from train.config.resume import check_resume_data
from train.config.run_files import RUN_ID_FILE, check_fresh_start, checkpoint_dir, save_hydra_files
from train.config.threads import apply_threads
from train.distributed.checkpoint_io import resolve_checkpoint
from train.errors import cause_of
from train.tracking.lineage import dataset_manifest, finetune_tags, requirements
from train.tracking.secrets import redact
from train.tracking.tags import (
    MLFLOW_RUN_ID_KEY,
    describe_run,
    flatten_for_params,
    log_text,
    mlflow_loggers,
    model_checkpoint,
    run_tags,
)
from train.util import launched_rank

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> float | None:
    """Train as configured; returns `cfg.optimized_metric` (for sweeps) when set."""
    run_dir = Path(cfg.paths.run_dir)
    composed = copy.deepcopy(cfg)  # as Hydra composed it, for .hydra/config.yaml
    check_config(cfg)
    ckpt_dir = checkpoint_dir(cfg)
    problem = check_fresh_start(run_dir, ckpt_dir, cfg.ckpt_path)
    if problem:
        raise ConfigError(problem)
    ckpt_path = resolve_checkpoint(cfg.ckpt_path, run_dir, ckpt_dir)
    L.seed_everything(cfg.seed, workers=True)

    loggers = build_loggers(cfg.logger, run_dir, ckpt_path)
    callbacks = [build_callback(name, c) for name, c in cfg.callbacks.items() if c is not None]
    if not loggers:
        # logger=none: LearningRateMonitor refuses a Trainer without loggers (nowhere to log).
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    strategy = instantiate(cfg.strategy) if cfg.strategy is not None else "auto"
    trainer: L.Trainer = instantiate(
        cfg.trainer, logger=loggers or False, callbacks=callbacks, strategy=strategy
    )
    plan = apply_batch_plan(cfg, trainer)  # needs the world size, known once the Trainer is
    threads = apply_threads(cfg.threads, trainer.num_devices)  # the node's processes share CPUs
    datamodule = instantiate(cfg.data)  # cheap, and fails fast on bad shard patterns
    check_resume_data(ckpt_path, datamodule, trainer.world_size)  # before any MLflow write
    module = build_module(cfg.model, cfg.seed)
    check_resolution(datamodule, module)
    check_whole_weights(trainer, module)  # before Lightning starts the other ranks in fit()
    resolved = redact(OmegaConf.to_container(cfg, resolve=True))  # params, artifacts, ckpts
    trainer.callbacks.append(ConfigInCheckpoint(resolved))
    if trainer.is_global_zero:
        print(f"{plan.describe()}; lr {cfg.model.optimizer.lr:g}; torch threads per process: "
              f"{threads}", flush=True)  # fmt: skip
    log_params(loggers, resolved, resuming=ckpt_path is not None)
    remember_run_ids(trainer, run_dir)
    record_lineage(trainer, resolved, datamodule, run_dir, module)
    save_hydra_files(composed)  # once the run's checks have passed
    if trainer.is_global_zero and cfg.ckpt_path == "last":
        print(f"Resuming from {ckpt_path}" if ckpt_path else "No checkpoint yet: fresh start",
              flush=True)  # fmt: skip

    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    close_process_group()

    if trainer.is_global_zero:
        print("\n".join(summary(trainer, run_dir)), flush=True)
    raise_if_terminated(trainer)
    metric = cfg.get("optimized_metric")
    if metric and metric in trainer.callback_metrics:
        return float(trainer.callback_metrics[metric])
    return None


def close_process_group() -> None:
    """Lightning leaves the process group up after fit. Left to interpreter shutdown, gloo's
    worker threads can still hold tensors then and abort the process (SIGABRT, "terminate called
    without an active exception") after a run that succeeded. Only after fit returned on every
    rank: destroying it while another rank is still in a collective would hang (as torchtitan)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def build_callback(name: str, node: DictConfig) -> L.Callback:
    """``callbacks.<name>``, where a part's own check (a missing file, a set that does not fit)
    fails as the one-line config error it is, not inside Hydra's traceback."""
    from hydra.errors import InstantiationException

    try:
        return instantiate(node)
    except InstantiationException as e:
        cause = cause_of(e, (ConfigError, FileNotFoundError))
        if cause is None:
            raise
        raise ConfigError(f"callbacks.{name}: {cause}") from None


def apply_batch_plan(cfg: DictConfig, trainer: L.Trainer) -> BatchPlan:
    """Derive micro-batch and accumulation from `batch.global_size` and the world size, scale
    the learning rate if `batch.lr_scaling` says so, and write both back into `cfg` (so the
    logged params and the checkpoint's config are what actually ran)."""
    b = cfg.batch
    accumulation = int(cfg.trainer.accumulate_grad_batches or 1)
    if b.global_size is not None and accumulation != 1:
        raise ConfigError(
            f"batch.global_size={b.global_size} derives gradient accumulation itself; remove "
            f"trainer.accumulate_grad_batches={accumulation}"
        )
    plan = plan_for(b, cfg.data, trainer.world_size, accumulation)
    trainer.accumulate_grad_batches = plan.accumulation
    lr = scaled_lr(cfg.model.optimizer.lr, b.lr_scaling, plan.global_size, b.reference_size)
    with open_dict(cfg):
        cfg.data.batch_size = plan.per_device
        cfg.trainer.accumulate_grad_batches = plan.accumulation
        cfg.model.optimizer.lr = lr
        cfg.batch.derived = {
            "global_size": plan.global_size,
            "per_device": plan.per_device,
            "accumulation": plan.accumulation,
            "world_size": plan.world_size,
        }
    return plan


def check_resolution(datamodule: Any, module: Any) -> None:
    """The built parts' twin of train.config.fit.check_resolution (which runs before anything is
    built), for parts whose config it cannot read: hub ids."""
    from train.config.fit import resolution_problem
    from train.models.parts import vae_scale_factor

    backbone, vae = getattr(module, "backbone", None), getattr(module, "vae", None)
    have = getattr(datamodule, "resolution", None)
    if backbone is not None and vae is not None and have is not None:
        problem = resolution_problem(have, backbone.sample_size, vae_scale_factor(vae),
                                     setting=backbone.sample_size_setting)  # fmt: skip
        if problem:
            raise ConfigError(problem)


def build_loggers(cfg: DictConfig, run_dir: Path, ckpt_path: str | None) -> list[Logger]:
    """Instantiate loggers; MLflow gets lineage tags and, on resume, the run it logged to before."""
    loggers = []
    for node in cfg.values():
        if node is None:
            continue
        extra: dict[str, Any] = {}
        if node._target_.endswith("MLFlowLogger"):
            if launched_rank() > 0:
                # Only rank 0 logs; building the logger on every rank of a torchrun/srun job
                # would have all of them create the tracking store at once (sqlite races).
                continue
            extra["tags"] = redact({**run_tags(), **(node.get("tags") or {})})
            run_id = resume_run_id(run_dir, ckpt_path)
            if run_id:
                extra["run_id"] = run_id
        loggers.append(build_with(node, extra))
    return loggers


def build_with(node: DictConfig, extra: dict[str, Any]) -> Any:
    """`node`'s target called with `extra` as given: `instantiate(node, **extra)` would merge
    `extra` into the config and resolve a `${...}` inside it (e.g. in the run's command tag)."""
    kwargs = OmegaConf.to_container(node, resolve=True)
    target = get_object(kwargs.pop("_target_"))
    return target(**{**kwargs, **extra})


def resume_run_id(run_dir: Path, ckpt_path: str | None) -> str | None:
    """The MLflow run a resumed run continues: the run folder's record, else the one kept in the
    checkpoint file (read memory-mapped: no tensor data is loaded)."""
    if ckpt_path is None:
        return None
    id_file = run_dir / RUN_ID_FILE
    if id_file.exists():
        return id_file.read_text().strip()
    if Path(ckpt_path).is_file():
        ckpt = torch.load(ckpt_path, map_location="cpu", mmap=True, weights_only=True)
        return ckpt.get(MLFLOW_RUN_ID_KEY)
    return None


def log_params(loggers: list[Logger], resolved: dict, resuming: bool) -> None:
    """The resolved config as params; a resumed MLflow run keeps the params it started with.

    MLflow params are immutable, and a resume legitimately changes some (`ckpt_path`,
    `trainer.max_steps`), so on resume the command that resumed it goes into a tag instead.
    """
    for logger in loggers:
        # `_run_id`, not `run_id`: the public property creates a run when there is none.
        if resuming and isinstance(logger, MLFlowLogger) and logger._run_id:
            logger.experiment.set_tag(logger.run_id, "resume_command", run_tags()["command"])
            continue
        logger.log_hyperparams(flatten_for_params(resolved))


def record_lineage(
    trainer: L.Trainer, resolved: dict, datamodule: Any, run_dir: Path, module: Any
) -> None:
    """Rank 0: the resolved config as a YAML artifact, the environment's packages, the
    dataset's description (tags) and shard manifest (artifact), and a fine-tuning run's base
    model and adapter (tags)."""
    if not trainer.is_global_zero or not mlflow_loggers(trainer):
        return
    data = resolved.get("data") or {}
    tags, manifest = dataset_manifest(datamodule, data.get("urls") or data.get("datasets"))
    tags |= finetune_tags(module)
    for logger in mlflow_loggers(trainer):
        for key, value in tags.items():
            logger.experiment.set_tag(logger.run_id, key, value)
    config = flatten_for_params(resolved)  # without Hydra's bookkeeping, as in the params
    log_text(trainer, OmegaConf.to_yaml(config), run_dir / "config.yaml", "config")
    log_text(trainer, manifest, run_dir / "dataset_manifest.tsv", "dataset")
    log_text(trainer, requirements(), run_dir / "requirements.txt", "environment")


def remember_run_ids(trainer: L.Trainer, run_dir: Path) -> None:
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        if isinstance(logger, MLFlowLogger):
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / RUN_ID_FILE).write_text(logger.run_id)


def summary(trainer: L.Trainer, run_dir: Path) -> list[str]:
    from train.callbacks.console import run_report

    # What was trained first (steps, samples/s, final loss, wall time), then where it went.
    lines = [*run_report(trainer), f"Run directory: {run_dir}"]
    for cb in trainer.callbacks:
        if isinstance(cb, ExportOnTrainEnd) and cb.path:
            lines.append(f"Export (diffusers layout, safetensors): {cb.path}")
        if isinstance(cb, SamplePreview) and cb.last_path:
            lines.append(f"Sample grid: {cb.last_path}")
    ckpt = model_checkpoint(trainer)
    if ckpt is not None and ckpt.last_model_path:
        lines.append(f"Last checkpoint: {ckpt.last_model_path}")
    return lines + describe_run(trainer)
