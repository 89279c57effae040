"""`ldm-eval RUN_DIR --watch`: a run's checkpoints scored as they appear, logged to the run's own
MLflow run at their steps, the export last (its scores on the registered model version)."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import mlflow
import pytest
from cli_runner import run_cli

from train.cli.eval_watch import SCORES_FILE
from train.cli.evaluate import main as eval_main


def quality_args(demo_shards: Path, tiny_clip_dir: Path, reference: Path) -> list[str]:
    return ["--reference", str(reference), "--val-urls", str(demo_shards), "--clip-model",
            str(tiny_clip_dir), "--num-samples", "8", "--steps", "2"]  # fmt: skip


def put(src: Path, dst: Path) -> None:
    """Appear whole, as the run's own writers make files appear (temp name, then rename)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-test")
    (shutil.copytree if src.is_dir() else shutil.copy2)(src, tmp)
    os.replace(tmp, dst)


def records(run: Path) -> list[dict]:
    path = run / SCORES_FILE
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def wait_until(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_watch_scores_checkpoints_as_they_appear_then_the_export(
    tiny_run, demo_shards: Path, tiny_clip_dir: Path, reference_16px: Path, tmp_path: Path
) -> None:
    run_dir, cfg = tiny_run
    # The session's run, replayed file by file into a new folder; its MLflow store copied, so
    # the session's run stays as it was.
    db = tmp_path / "mlflow.db"
    shutil.copy2(Path(cfg.paths.root) / "mlflow.db", db)
    run = tmp_path / "run"
    args = ["ldm-eval", str(run), "--watch", "--poll-seconds", "0.05", "--tracking-uri",
            f"sqlite:///{db}", *quality_args(demo_shards, tiny_clip_dir, reference_16px)]
    result = {}
    watcher = threading.Thread(target=lambda: result.update(proc=run_cli(eval_main, args)))
    watcher.start()  # before the run folder exists, as a job may
    for name in ("mlflow_run_id", "config.yaml"):
        put(run_dir / name, run / name)
    ckpts = run_dir / "checkpoints"
    put(ckpts / "step_0000002.ckpt", run / "checkpoints" / "step_0000002.ckpt")
    wait_until(lambda: len(records(run)) == 1 or not watcher.is_alive())
    assert [r["step"] for r in records(run)] == [2]  # scored while the "run" goes on
    for name in ("step_0000004.ckpt", "last.ckpt"):
        put(ckpts / name, run / "checkpoints" / name)
    put(run_dir / "export", run / "export")
    watcher.join(timeout=300)
    proc = result["proc"]
    assert proc.returncode == 0, proc.stderr[-3000:]

    done = records(run)
    assert [(r["step"], r["source"]) for r in done] == [
        (2, "step_0000002.ckpt"), (4, "step_0000004.ckpt"), (4, "export")]  # fmt: skip
    by_step = {r["step"]: r["scores"] for r in done[:2]}
    assert by_step[2]["fid"] != by_step[4]["fid"]  # other weights, other images
    assert done[2]["scores"] == by_step[4]  # the export is step 4's weights: not scored twice
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    history = client.get_metric_history(run_id, "eval/fid")
    assert sorted((m.step, m.value) for m in history) == [(2, by_step[2]["fid"]),
                                                           (4, by_step[4]["fid"])]  # fmt: skip
    assert {"eval/kid", "eval/clip_score"} <= client.get_run(run_id).data.metrics.keys()
    (version,) = client.search_model_versions(f"run_id='{run_id}'")
    assert float(version.tags["eval.fid"]) == pytest.approx(by_step[4]["fid"])

    # Restarted (a requeued job) over the finished run: nothing is scored or logged again.
    again = run_cli(eval_main, args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert records(run) == done
    assert len(client.get_metric_history(run_id, "eval/fid")) == 2


def test_watch_gives_up_on_a_run_that_never_exports(tmp_path: Path) -> None:
    proc = run_cli(eval_main, ["ldm-eval", str(tmp_path / "never"), "--watch", "--poll-seconds",
                               "0.05", "--idle-timeout", "0.3"])  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "nothing new" in proc.stdout and "0 evaluations" in proc.stdout


def test_watch_refuses_an_export_and_bad_inputs_before_waiting(
    tiny_run, demo_shards: Path, tiny_clip_dir: Path, tmp_path: Path
) -> None:
    run_dir, _ = tiny_run
    proc = run_cli(eval_main, ["ldm-eval", str(run_dir / "export"), "--watch"])
    assert proc.returncode == 2 and "is an export; --watch takes the run folder" in proc.stderr
    missing = tmp_path / "nope.safetensors"
    proc = run_cli(eval_main, ["ldm-eval", str(tmp_path / "run"), "--watch",
                               *quality_args(demo_shards, tiny_clip_dir, missing)])  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert f"--reference: reference statistics {missing} do not exist" in proc.stderr
