"""Hydra sweeps (`ldm-train -m +sweep=...`) as MLflow parent and child runs.

`MLflowSweep` is a Hydra callback (registered by `conf/sweep/*.yaml` under `hydra.callbacks`).
In the launching process it opens one parent run per sweep and records the sweep's settings;
each trial's MLflow run is a child of it through the `mlflow.parentRunId` tag (`sweep_tags()`,
part of the run's lineage tags). When the sweep ends it reads the children back from the tracking
store, not from memory, because with the submitit launcher the trials ran in other processes on
other machines, and tags the parent with the best one.
"""

from __future__ import annotations

import atexit
import enum
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from train.tracking.secrets import redact
from train.tracking.spool import is_http
from train.tracking.trial import (  # noqa: F401 - re-exported for the sweep's users
    MAX_TAG_CHARS,
    OVERRIDES_TAG,
    PARENT_RUN_ENV,
    PARENT_TAG,
    TRIAL_TAG,
    sweep_tags,
    task_overrides,
)

log = logging.getLogger(__name__)

MAX_PARAM_CHARS = 6000


class MLflowSweep(Callback):
    """Parent MLflow run of a sweep; the best child (by `metric`) is tagged on it at the end.

    metric: what the trials return and log (default: the config's `optimized_metric`).
    direction: "minimize" | "maximize" (default: the sweeper's `direction`, else minimize).
    run_name: the parent run's name (default: `<experiment_name>-sweep`).
    Pickled with the launcher into submitit jobs: only plain values are kept as attributes.
    """

    def __init__(
        self, metric: str | None = None, direction: str | None = None, run_name: str | None = None
    ) -> None:
        self.metric = metric
        self.direction = direction
        self.run_name = run_name
        self.tracking_uri: str | None = None
        self.parent_run_id: str | None = None
        self._previous_env: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        node = _mlflow_node(config)
        if node is None:
            log.warning("MLflowSweep: no MLflow logger configured; the sweep is not tracked")
            return
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self.metric = self.metric or config.get("optimized_metric")
        try:
            check_scored(config, self.metric)
        except ValueError as e:
            # Hydra turns a callback's exceptions into warnings; a sweep whose trials cannot be
            # scored must not start (exit code as ldm-train's own config errors).
            print(f"Config error: {e}", file=sys.stderr)
            sys.exit(2)
        for url in (node.tracking_uri, config.hydra.sweeper.get("storage")):
            make_sqlite_folder(url)  # Optuna's and MLflow's SQLite stores do not create it
        self.direction = self.direction or _sweeper_direction(config)
        self.tracking_uri = str(node.tracking_uri)
        client = MlflowClient(tracking_uri=self.tracking_uri)
        experiment_id = _experiment_id(client, node)
        name = self.run_name or f"{config.experiment_name}-sweep"
        run = client.create_run(experiment_id, run_name=name, tags=_parent_tags())
        self.parent_run_id = run.info.run_id
        self._previous_env = os.environ.get(PARENT_RUN_ENV)
        os.environ[PARENT_RUN_ENV] = self.parent_run_id
        # Hydra has no multirun-failed hook: a sweep that raises must not leave the parent
        # RUNNING forever.
        atexit.register(self._end_if_open)
        params = [Param(k, v) for k, v in sweep_params(config, self.metric, self.direction).items()]
        for start in range(0, len(params), 100):  # MLflow's cap on params per batch
            client.log_batch(self.parent_run_id, params=params[start : start + 100])
        log.info(f"MLflow parent run of this sweep: {self.parent_run_id} ({name})")

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Runs in the trial's process (in-process or a submitit job), before ldm-train's task.
        if self.parent_run_id:
            os.environ[PARENT_RUN_ENV] = self.parent_run_id

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.parent_run_id or not self.tracking_uri:
            return
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=self.tracking_uri)
        children = child_runs(client, self.parent_run_id)
        best = best_run(children, self.metric, self.direction or "minimize")
        client.set_tag(self.parent_run_id, "sweep.num_children", str(len(children)))
        if best is not None:
            master = set(task_overrides(config.hydra.overrides.task))
            tags = best_tags(best, self.metric or "", master)
            tags |= export_tags(best, Path(str(config.paths.root)))
            for key, value in tags.items():
                client.set_tag(self.parent_run_id, key, value)
            log.info(f"Best trial: {best.data.tags.get(TRIAL_TAG)} (run {best.info.run_id})")
            if "best_export_command" in tags:
                print(f"Best trial's export: {tags['best_export_command']}", flush=True)
        else:
            log.warning(f"MLflowSweep: no finished trial logged {self.metric!r}")
        client.set_terminated(self.parent_run_id, "FINISHED" if best is not None else "FAILED")
        self._restore_env()
        self.parent_run_id = None

    def _end_if_open(self) -> None:
        if self.parent_run_id and self.tracking_uri:
            from mlflow import MlflowClient

            MlflowClient(tracking_uri=self.tracking_uri).set_terminated(
                self.parent_run_id, "FAILED"
            )
            self.parent_run_id = None

    def _restore_env(self) -> None:
        if self._previous_env is None:
            os.environ.pop(PARENT_RUN_ENV, None)
        else:
            os.environ[PARENT_RUN_ENV] = self._previous_env


def _mlflow_node(config: DictConfig) -> DictConfig | None:
    for node in (config.get("logger") or {}).values():
        if node is not None and str(node.get("_target_", "")).endswith("MLFlowLogger"):
            return node
    return None


def check_scored(config: DictConfig, metric: str | None) -> None:
    """Fail before any trial is launched if trials could not report `metric`: otherwise every
    trial trains in full and the sweeper only then finds it returned nothing."""
    if not metric:
        raise ValueError("a tracked sweep needs optimized_metric (e.g. optimized_metric=val/loss)")
    data = config.get("data")
    if (
        metric.startswith("val/")
        and data is not None
        and (OmegaConf.is_missing(data, "val_urls") or data.get("val_urls") is None)
    ):
        raise ValueError(f"{metric} needs validation data: set data.val_urls=<held-out shards>")


def make_sqlite_folder(url: Any) -> None:
    """Create the folder of a `sqlite:///<path>` database URL (other URLs: nothing to do)."""
    if isinstance(url, str) and url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)


def _experiment_id(client: Any, node: DictConfig) -> str:
    """The trials' experiment, created here as MLFlowLogger would (same artifact location) so
    that concurrent trials do not race to create it."""
    experiment = client.get_experiment_by_name(str(node.experiment_name))
    if experiment is not None and experiment.lifecycle_stage != "deleted":
        return experiment.experiment_id
    location = node.get("artifact_location")
    if is_http(str(node.get("tracking_uri") or "")) and location and "://" not in str(location):
        location = None  # as the logger does: a server keeps artifacts in its own store
    return client.create_experiment(str(node.experiment_name), artifact_location=location)


def _parent_tags() -> dict[str, str]:
    from train.tracking.tags import run_tags  # lightning import: only once a sweep is tracked

    return {**run_tags(), "sweep.role": "parent"}


def _plain(value: Any) -> Any:
    return value.name if isinstance(value, enum.Enum) else value


def _sweeper_direction(config: DictConfig) -> str:
    direction = _plain(config.hydra.sweeper.get("direction", "minimize"))
    if isinstance(direction, list | tuple):  # multi-objective: the first is `metric`'s
        direction = _plain(direction[0])
    return str(direction)


def _container(node: DictConfig) -> Any:
    try:
        return OmegaConf.to_container(node, resolve=True)
    except OmegaConfBaseException:  # e.g. ${hydra:job.num}, set only inside a trial
        return OmegaConf.to_container(node, resolve=False)


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict) and value:
        for key, item in value.items():
            _flatten(f"{prefix}.{key}", item, out)
    else:
        out[prefix] = str(_plain(value))[:MAX_PARAM_CHARS]


def sweep_params(config: DictConfig, metric: str | None, direction: str | None) -> dict[str, str]:
    """The sweep's settings as MLflow params: sweeper (search space, trials, direction, Optuna
    storage and study), launcher, metric and the command line's overrides."""
    out: dict[str, str] = {}
    _flatten("sweep.sweeper", redact(_container(config.hydra.sweeper)), out)
    _flatten("sweep.launcher", redact(_container(config.hydra.launcher)), out)
    out["sweep.metric"] = str(metric)
    out["sweep.direction"] = str(direction)
    out["sweep.dir"] = str(config.hydra.sweep.dir)
    out["sweep.overrides"] = " ".join(task_overrides(config.hydra.overrides.task))[:MAX_PARAM_CHARS]
    return out


def child_runs(client: Any, parent_run_id: str) -> list[Any]:
    """Every run tagged as a child of the parent, in any state, over all result pages."""
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    runs: list[Any] = []
    token = None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
            max_results=1000,
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def best_run(runs: list[Any], metric: str | None, direction: str) -> Any | None:
    """The finished run with the best `metric` (ties: the lowest trial number)."""
    if direction not in ("minimize", "maximize"):
        raise ValueError(f"direction must be minimize or maximize, not {direction!r}")
    scored = [
        r for r in runs if r.info.status == "FINISHED" and metric and metric in r.data.metrics
    ]
    if not scored:
        return None
    sign = 1.0 if direction == "minimize" else -1.0

    def key(run: Any) -> tuple[float, int]:
        trial = run.data.tags.get(TRIAL_TAG, "")
        return sign * run.data.metrics[metric], int(trial) if trial.isdigit() else 1 << 30

    return min(scored, key=key)


def best_tags(best: Any, metric: str, master_overrides: set[str]) -> dict[str, str]:
    """Parent tags naming the best trial; its overrides are those the sweep chose (the ones not
    already on the sweep's command line)."""
    trial_overrides = best.data.tags.get(OVERRIDES_TAG, "").splitlines()
    chosen = [o for o in trial_overrides if o not in master_overrides]
    return {
        "best_run_id": best.info.run_id,
        "best_run_name": best.info.run_name or "",
        "best_trial": best.data.tags.get(TRIAL_TAG, ""),
        f"best_{metric}": repr(best.data.metrics[metric]),
        "best_overrides": " ".join(chosen)[:MAX_TAG_CHARS],
    }


def export_tags(best: Any, root: Path) -> dict[str, str]:
    """Parent tags with the best trial's last checkpoint and the command that exports it. Trials
    keep their checkpoint, not an export (conf/sweep/: what differs between trials is the
    trained weights; the frozen parts are rebuilt by ldm-export exactly as training wrote them)."""
    ckpt = best.data.tags.get("checkpoint.last")
    if not ckpt:
        return {}
    out = root / "exports" / (best.info.run_name or best.info.run_id)
    return {
        "best_checkpoint": ckpt,
        "best_export_command": f"ldm-export {shlex.quote(ckpt)} {shlex.quote(str(out))}",
    }
