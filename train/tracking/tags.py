"""What a run records about itself: tags for lineage and artifacts in MLflow."""

from __future__ import annotations

import platform
import shlex
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger
from mlflow.exceptions import MlflowException

from train.tracking.lineage import environment_ids, package_versions
from train.tracking.secrets import redact_overrides
from train.tracking.trial import sweep_tags


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


MLFLOW_RUN_ID_KEY = "ldm_mlflow_run_id"  # in checkpoints


def run_tags() -> dict[str, str]:
    """Lineage tags: code version, host and the command that started the run."""
    tags = {
        "host": platform.node(),
        "command": " ".join(shlex.quote(a) for a in redact_overrides(sys.argv)),
        "python": platform.python_version(),
    }
    commit = _git("rev-parse", "HEAD")
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["git.dirty"] = str(bool(_git("status", "--porcelain")))
    return tags | package_versions() | environment_ids() | sweep_tags()


def model_checkpoint(trainer: L.Trainer) -> ModelCheckpoint | None:
    """The run's ModelCheckpoint (`trainer.checkpoint_callback` may be the preemption callback,
    another `Checkpoint`, when `callbacks.checkpoint` is null)."""
    return next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)


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


def log_text(trainer: L.Trainer, text: str, path: Path, artifact_path: str) -> None:
    """Write `text` to `path` in the run folder and log that file to every MLflow run."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    log_artifact(trainer, path, artifact_path)


def registered_version(trainer: L.Trainer, name: str, artifact_path: str) -> str | None:
    """The version of registered model `name` made from this run's `artifact_path`, if any (a
    run resumed past its end exports the same step again). None when the tracker cannot say."""
    for logger in mlflow_loggers(trainer):
        source = f"runs:/{logger.run_id}/{artifact_path}"
        try:
            versions = logger.experiment.search_model_versions(f"name='{name}'")
        except (MlflowException, OSError):
            return None
        for version in versions:
            if version.source == source:
                print(f"Export of step {trainer.global_step} is already model {name!r} version "
                      f"{version.version}: nothing uploaded or registered again")  # fmt: skip
                return str(version.version)
    return None


def register_export(
    trainer: L.Trainer,
    name: str,
    artifact_path: str,
    fmt: str = "diffusers",
    tags: dict[str, str] | None = None,
) -> None:
    """Register the logged export folder as a new version of the registered model `name`, linked
    to its run; the version's tags name its `fmt` (and `tags`: an adapter's lineage). A tracker
    that refuses (or is away) costs a warning, never the finished run."""
    for logger in mlflow_loggers(trainer):
        client, run_id = logger.experiment, logger.run_id
        try:
            try:
                client.create_registered_model(name, description="ldm-pipeline exports")
            except MlflowException as e:
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            version = client.create_model_version(
                name,
                source=f"runs:/{run_id}/{artifact_path}",
                run_id=run_id,
                # The run name as configured: MLFlowLogger has no public accessor for it.
                tags={
                    "format": fmt,
                    "run_name": str(logger._run_name),
                    "step": str(trainer.global_step),
                    **(tags or {}),
                },
                description=f"{fmt} export of run {run_id}",
            )
            print(f"Registered model {name!r} version {version.version} (run {run_id})")
        except (MlflowException, OSError) as e:
            warnings.warn(
                f"could not register the export as model {name!r}: {e}. The export is in the "
                f"run's artifacts ({artifact_path}/); register it later with "
                f"mlflow.register_model('runs:/{run_id}/{artifact_path}', {name!r})",
                stacklevel=2,
            )


def tag_registered_version(trainer: L.Trainer, tags: dict[str, float | str]) -> int:
    """Put ``tags`` on the model versions this run registered at this step (rank 0, after the
    export callback); returns how many versions got them. A tracker away costs a warning."""
    return sum(
        tag_versions(logger.experiment, logger.run_id, trainer.global_step, tags)
        for logger in mlflow_loggers(trainer)
    )


def tag_versions(client: Any, run_id: str, step: int, tags: dict[str, float | str]) -> int:
    """Put ``tags`` on the model versions run ``run_id`` registered from its export of ``step``
    (an MlflowClient's); returns how many. A tracker away costs a warning."""
    tagged = 0
    try:
        for version in client.search_model_versions(f"run_id='{run_id}'"):
            if version.tags.get("step") != str(step):
                continue
            for key, value in tags.items():
                client.set_model_version_tag(version.name, version.version, key, str(value))
            tagged += 1
    except (MlflowException, OSError) as e:
        warnings.warn(f"MLflow: could not tag the registered model version: {e}", stacklevel=2)
    return tagged


class CheckpointPathTags(L.Callback):
    """Tags `checkpoint.last` and `checkpoint.best` with their paths on the shared filesystem:
    the policy for models too big to upload (`logger.mlflow.log_model` uploads them instead:
    `true` last and best at the end, `all` every save)."""

    def __init__(self) -> None:
        self._tagged: dict[str, str] = {}

    def _update(self, trainer: L.Trainer) -> None:
        cb = model_checkpoint(trainer)
        if not trainer.is_global_zero or cb is None:
            return
        paths = {"checkpoint.last": cb.last_model_path, "checkpoint.best": cb.best_model_path}
        for key, path in paths.items():
            if path and self._tagged.get(key) != path:
                for logger in mlflow_loggers(trainer):
                    logger.experiment.set_tag(logger.run_id, key, str(Path(path).resolve()))
                self._tagged[key] = path

    # ModelCheckpoint saves after the other callbacks' batch-end hooks: a step late, and the
    # final one at the end of training.
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._update(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._update(trainer)


def describe_run(trainer: L.Trainer) -> list[str]:
    """Human-readable lines telling where this run's tracking data is and how to browse it."""
    lines = []
    for logger in mlflow_loggers(trainer):
        # MLFlowLogger keeps its constructor's tracking_uri and experiment_name unexposed (its
        # public `name` is the experiment id); these are the URI and name as the user gave them.
        uri, name = logger._tracking_uri, logger._experiment_name
        lines.append(f"MLflow run: {logger.run_id} (experiment {name!r}) at {uri}")
        if uri and not uri.startswith("http"):
            lines.append(f"  browse it: mlflow ui --backend-store-uri {uri}")
    return lines


def flatten_for_params(cfg: dict[str, Any]) -> dict[str, Any]:
    """Drop Hydra's bookkeeping keys; MLFlowLogger flattens nested dicts itself."""
    return {k: v for k, v in cfg.items() if k != "hydra"}
