"""`ldm-eval --watch RUN_DIR`: score a training run's checkpoints as they are written, in a
process (a job) of its own, so that the training devices never wait for evaluation.

Each new `checkpoints/step_<N>.ckpt` becomes a pipeline in memory (EMA weights where the run
keeps them, as its export would), is scored like an export, and its scores go to the run's
MLflow run as `eval/<name>` at step N, and to `RUN_DIR/eval/scores.jsonl`. When the run's export
appears, the export is scored as the final result and its scores tag the model version the run
registered. The JSONL file is the watcher's memory: a restarted (requeued) job skips what it
has scored. Checkpoints that the run's retention deletes before they are scored are skipped.
"""

from __future__ import annotations

import json
import re
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from train.config.run_files import RUN_ID_FILE

STEP_CHECKPOINT = re.compile(r"^step_(\d+)\.ckpt$")  # callbacks.checkpoint's names, not temp ones
SCORES_FILE = Path("eval") / "scores.jsonl"
FINAL = "export"

Scorer = Callable[[Any], dict[str, float]]  # a diffusers pipeline -> scores


def step_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of the run's complete step checkpoints, oldest first. A sharded folder
    counts once its marker is written (DeepSpeed's `latest`, our FSDP `meta.pt`)."""
    found = []
    for path in (run_dir / "checkpoints").glob("step_*.ckpt"):
        match = STEP_CHECKPOINT.match(path.name)
        complete = path.is_file() or (path / "latest").is_file() or (path / "meta.pt").is_file()
        if match and complete:
            found.append((int(match.group(1)), path))
    return sorted(found)


def scored(run_dir: Path) -> list[dict[str, Any]]:
    """The records already written, one per scored checkpoint (and the export)."""
    path = run_dir / SCORES_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def final_step(run_dir: Path, records: list[dict[str, Any]]) -> int:
    """The step the export was made at: `last.ckpt`'s (read memory-mapped), else the newest
    scored checkpoint's."""
    import torch

    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        ckpt = torch.load(last, map_location="cpu", mmap=True, weights_only=True)
        return int(ckpt["global_step"])
    return max((r["step"] for r in records), default=0)


class RunTracker:
    """The MLflow run a run folder logs to (its `mlflow_run_id`, tracker from its config.yaml,
    or `tracking_uri`), looked up at the first score: a watcher may start before the run does.
    Without one, scores only go to the JSONL file."""

    def __init__(self, run_dir: Path, tracking_uri: str | None = None) -> None:
        self.run_dir, self.tracking_uri = run_dir, tracking_uri
        self.client, self.run_id = None, None

    def connect(self) -> bool:
        if self.client is None and (self.run_dir / RUN_ID_FILE).exists():
            from mlflow.tracking import MlflowClient

            uri = self.tracking_uri or self._configured_uri(self.run_dir)
            self.run_id = (self.run_dir / RUN_ID_FILE).read_text().strip()
            self.client = MlflowClient(uri)
            print(f"logging to MLflow run {self.run_id} ({self.client.tracking_uri})")
        return self.client is not None

    @staticmethod
    def _configured_uri(run_dir: Path) -> str | None:
        config = run_dir / "config.yaml"
        if not config.exists():
            return None  # MLflow's own default: MLFLOW_TRACKING_URI
        logger = (yaml.safe_load(config.read_text()) or {}).get("logger") or {}
        return (logger.get("mlflow") or {}).get("tracking_uri")

    def log(self, scores: dict[str, float], step: int) -> None:
        if not self.connect():
            print(f"{self.run_dir} has no {RUN_ID_FILE}: step {step}'s scores go to "
                  f"{SCORES_FILE} only")  # fmt: skip
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(f"eval/{k}", float(v), now, step) for k, v in scores.items()]
        try:
            self.client.log_batch(self.run_id, metrics=metrics)
        except Exception as e:  # a tracker away costs a warning; the JSONL keeps the scores
            warnings.warn(f"MLflow: could not log step {step}'s scores: {e}", stacklevel=2)

    def tag_final(self, scores: dict[str, float], step: int) -> int:
        if not self.connect():
            return 0
        from train.tracking.tags import tag_versions

        return tag_versions(self.client, self.run_id, step, {f"eval.{k}": v for k, v in
                                                             scores.items()})  # fmt: skip


def record(run_dir: Path, entry: dict[str, Any]) -> None:
    path = run_dir / SCORES_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(entry) + "\n")


class Watcher:
    """Polls `run_dir` every `poll_s` seconds until the export is scored, or until nothing new
    has appeared for `idle_timeout_s` (a run that died)."""

    def __init__(self, run_dir: Path, score: Scorer, load_checkpoint: Callable[[Path], Any],
                 load_export: Callable[[Path], Any], tracker: RunTracker, poll_s: float = 30.0,
                 idle_timeout_s: float = 7200.0) -> None:  # fmt: skip
        self.run_dir, self.score, self.tracker = run_dir, score, tracker
        self.load_checkpoint, self.load_export = load_checkpoint, load_export
        self.poll_s, self.idle_timeout_s = poll_s, idle_timeout_s

    def run(self) -> list[dict[str, Any]]:
        idle_since = time.monotonic()
        while True:
            if self.score_new_checkpoints():
                idle_since = time.monotonic()
            if (self.run_dir / FINAL / "model_index.json").is_file():
                self.score_new_checkpoints()  # the last ones, written before the export
                self.score_export()
                return scored(self.run_dir)
            if time.monotonic() - idle_since > self.idle_timeout_s:
                print(f"nothing new in {self.run_dir} for {self.idle_timeout_s:.0f} s and no "
                      "export: stopping (the run ended without exporting?)")  # fmt: skip
                return scored(self.run_dir)
            time.sleep(self.poll_s)

    def score_new_checkpoints(self) -> int:
        done = {r["step"] for r in scored(self.run_dir) if r["source"] != FINAL}
        new = [(s, p) for s, p in step_checkpoints(self.run_dir) if s not in done]
        for step, path in new:
            try:
                pipe = self.load_checkpoint(path)
            except FileNotFoundError:  # the run's retention removed it meanwhile
                print(f"step {step}: {path.name} was removed before it could be scored")
                continue
            self._publish(self.score(pipe), step, path.name)
        return len(new)

    def score_export(self) -> None:
        records = scored(self.run_dir)
        if any(r["source"] == FINAL for r in records):
            return  # a restarted watcher over a finished run
        step = final_step(self.run_dir, records)
        same = [r for r in records if r["step"] == step]  # the export is that checkpoint's EMA
        scores = same[-1]["scores"] if same else self.score(self.load_export(self.run_dir / FINAL))
        self._publish(scores, step, FINAL, log=not same)
        tagged = self.tracker.tag_final(scores, step)
        print(f"export (step {step}): {tagged} registered model version(s) tagged")

    def _publish(self, scores: dict[str, float], step: int, source: str, log: bool = True) -> None:
        if log:
            self.tracker.log(scores, step)
        record(self.run_dir, {"step": step, "source": source, "scores": scores})
        shown = ", ".join(f"{k} {v:.4g}" for k, v in scores.items())
        print(f"step {step} ({source}): {shown}", flush=True)
