"""What a run records about itself: tags for lineage and artifacts in MLflow."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import MLFlowLogger


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def run_tags() -> dict[str, str]:
    """Lineage tags: code version, host and the command that started the run."""
    tags = {
        "host": platform.node(),
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "python": platform.python_version(),
    }
    commit = _git("rev-parse", "HEAD")
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["git.dirty"] = str(bool(_git("status", "--porcelain")))
    for var in ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"):
        if os.environ.get(var):
            tags[var.lower()] = os.environ[var]
    return tags


def mlflow_loggers(trainer: L.Trainer) -> list[MLFlowLogger]:
    return [lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)]


def log_artifact(trainer: L.Trainer, path: str | Path, artifact_path: str) -> None:
    """Upload a file or folder to every MLflow run of this trainer (call on global rank 0)."""
    path = Path(path)
    for logger in mlflow_loggers(trainer):
        if path.is_dir():
            logger.experiment.log_artifacts(logger.run_id, str(path), artifact_path)
        else:
            logger.experiment.log_artifact(logger.run_id, str(path), artifact_path)


def describe_run(trainer: L.Trainer) -> list[str]:
    """Human-readable lines telling where this run's tracking data is and how to browse it."""
    lines = []
    for logger in mlflow_loggers(trainer):
        uri = logger._tracking_uri  # the URI the user configured, as given
        name = logger._experiment_name
        lines.append(f"MLflow run: {logger.run_id} (experiment {name!r}) at {uri}")
        if uri and not uri.startswith("http"):
            lines.append(f"  browse it: mlflow ui --backend-store-uri {uri}")
    return lines


def flatten_for_params(cfg: dict[str, Any]) -> dict[str, Any]:
    """Drop Hydra's bookkeeping keys; MLFlowLogger flattens nested dicts itself."""
    return {k: v for k, v in cfg.items() if k != "hydra"}
