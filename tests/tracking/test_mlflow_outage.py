"""Tracker outages: a server absent at start, or killed mid-run and restarted, neither kills nor
stalls training (exit 0), and afterwards the server holds every metric step exactly once: sent
by the logger's background sender when the server is back, or by `python -m train.cli.mlflow_sync`.

The end-to-end runs use short client timeouts (MLFLOW_HTTP_REQUEST_*), as in a real outage the
client's defaults (7 retries, 120 s timeout) would only make the sender's calls longer."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from cli_runner import run_cli
from mlflow import MlflowClient
from mlflow_server import free_port

from train.cli.mlflow_sync import main, sync
from train.cli.train import main as train_main
from train.errors import ConfigError
from train.tracking.logger import ResilientMLFlowLogger
from train.tracking.spool import SPOOL_TAG, Spool

BIN = Path(sys.executable).parent
STEPS = 30
FAST_FAIL = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
}


def train_command(root: Path, shards: Path, uri: str, *overrides: str):
    """argv and environment of `ldm-train experiment=tiny` writing under `root`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env |= FAST_FAIL | {"LDM_OUTPUT_DIR": str(root), "OMP_NUM_THREADS": "1"}
    cmd = [
        str(BIN / "ldm-train"), "experiment=tiny", f"data.urls={shards}",
        f"trainer.max_steps={STEPS}", "trainer.log_every_n_steps=1",
        f"logger.mlflow.tracking_uri={uri}", *overrides,
    ]  # fmt: skip
    return cmd, env


def start_train(root: Path, shards: Path, uri: str, *overrides: str) -> subprocess.Popen:
    """`ldm-train` in a process of its own (the server goes away while it runs), output in
    `root/train.log`."""
    cmd, env = train_command(root, shards, uri, *overrides)
    log = (root / "train.log").open("a")
    try:
        return subprocess.Popen(cmd, env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT)
    finally:
        log.close()


def finish(proc: subprocess.Popen, root: Path, timeout: float = 240) -> str:
    proc.wait(timeout=timeout)
    out = (root / "train.log").read_text(errors="replace")
    assert proc.returncode == 0, out[-4000:]
    return out


def run_sync(path: Path, uri: str) -> str:
    """`ldm-mlflow-sync PATH --tracking-uri URI`, in this process (`cli_runner`)."""
    argv = ["ldm-mlflow-sync", str(path), "--tracking-uri", uri]
    out = run_cli(main, argv, env={**os.environ, **FAST_FAIL})
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def steps(client: MlflowClient, run_id: str, key: str = "train/loss") -> Counter:
    return Counter(m.step for m in client.get_metric_history(run_id, key))


def artifacts(client: MlflowClient, run_id: str, path: str) -> set[str]:
    return {a.path for a in client.list_artifacts(run_id, path)}


@pytest.mark.slow
def test_server_absent_at_start_then_synced_then_resumed(tmp_path, demo_shards, mlflow_server):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.monotonic()
    proc = start_train(tmp_path, demo_shards, dead, "experiment_name=outage_start",
                       "logger.mlflow.flush_timeout_s=3")  # fmt: skip
    out = finish(proc, tmp_path)
    elapsed = time.monotonic() - t0
    print(f"training with the server absent: exit 0 in {elapsed:.1f} s")
    assert elapsed < 90  # ~20 s here; MLflow's client alone fails after ~250 s
    assert f"MLflow tracking server {dead} is unreachable" in out
    run_dir = tmp_path / "runs" / "outage_start"
    spool = run_dir / "mlflow_spool"
    assert f"python -m train.cli.mlflow_sync {spool} --tracking-uri {dead}" in out
    provisional = (run_dir / "mlflow_run_id").read_text().strip()
    assert provisional.startswith("offline-")
    unacked = shutil.copytree(spool, tmp_path / "spool_before_sync")  # as if a sync crashed

    t0 = time.monotonic()
    synced = run_sync(run_dir, mlflow_server.uri)
    print(f"sync: {time.monotonic() - t0:.1f} s")
    run_id = re.search(r"MLflow run: ([0-9a-f]{32}) ", synced)[1]
    client = MlflowClient(mlflow_server.uri)
    assert steps(client, run_id) == dict.fromkeys(range(STEPS), 1)
    assert steps(client, run_id, "lr-AdamW") == dict.fromkeys(range(STEPS), 1)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["trainer/max_steps"] == str(STEPS)
    assert run.data.params["experiment_name"] == "outage_start"
    assert len(run.data.params) > 100  # the whole resolved config
    assert run.data.tags[SPOOL_TAG] == provisional and run.data.tags["mlflow.runName"]
    export = f"export/step_{STEPS:07d}"  # one artifact path per training end
    assert f"{export}/model_index.json" in artifacts(client, run_id, export)
    assert "samples/final.png" in artifacts(client, run_id, "samples")

    # Again, and a replay of the spool as it was before the first sync: nothing twice.
    assert "Sent 0 spooled writes" in run_sync(run_dir, mlflow_server.uri)
    assert f"MLflow run: {run_id} " in run_sync(unacked, mlflow_server.uri)
    assert steps(client, run_id) == dict.fromkeys(range(STEPS), 1)
    experiment = client.get_experiment_by_name("outage_start")
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [run_id]

    # A resume (its run folder names the provisional id) logs into the server's run.
    cmd, env = train_command(tmp_path, demo_shards, mlflow_server.uri, "ckpt_path=last",
                             "experiment_name=outage_start", f"trainer.max_steps={STEPS + 4}")
    resumed = run_cli(train_main, cmd, env=env, cwd=tmp_path)  # nothing to kill: in this process
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert (run_dir / "mlflow_run_id").read_text().strip() == run_id
    assert steps(client, run_id) == dict.fromkeys(range(STEPS + 4), 1)
    assert client.get_run(run_id).data.tags["resume_command"]


@pytest.mark.slow
def test_server_killed_mid_run_and_restarted(tmp_path, demo_shards, mlflow_server):
    client = MlflowClient(mlflow_server.uri)
    t0 = time.monotonic()
    proc = start_train(tmp_path, demo_shards, mlflow_server.uri, "experiment_name=outage_mid")
    run_dir = tmp_path / "runs" / "outage_mid"
    run_id = None
    while run_id is None or len(steps(client, run_id)) < 3:
        assert proc.poll() is None and time.monotonic() - t0 < 120, "no steps reached the server"
        if (run_dir / "mlflow_run_id").exists():
            # Empty while the run is writing it: read again on the next turn.
            run_id = (run_dir / "mlflow_run_id").read_text().strip() or None
        time.sleep(0.1)
    down_at = time.time()
    mlflow_server.kill()
    assert proc.poll() is None  # killed mid-run
    time.sleep(3)
    mlflow_server.start()
    up_at = time.time()
    print(f"server away {up_at - down_at:.1f} s")
    out = finish(proc, tmp_path)
    print(f"training with the outage: exit 0 in {time.monotonic() - t0:.1f} s")
    assert "stopped answering" in out and "answers again" in out

    history = client.get_metric_history(run_id, "train/loss")
    assert Counter(m.step for m in history) == dict.fromkeys(range(STEPS), 1)
    during = [m.step for m in history if down_at * 1000 < m.timestamp < up_at * 1000]
    assert during, "no step was trained while the server was away"
    print(f"steps trained while the server was away: {len(during)}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    export = f"export/step_{STEPS:07d}"  # one artifact path per training end
    assert f"{export}/model_index.json" in artifacts(client, run_id, export)
    assert Spool(run_dir / "mlflow_spool").pending() == []


def make_logger(tmp_path: Path, uri: str, **kwargs) -> ResilientMLFlowLogger:
    kwargs = {"flush_timeout_s": 1.0, "probe_timeout_s": 0.5, **kwargs}
    return ResilientMLFlowLogger("unit", "r1", uri, spool_dir=str(tmp_path / "spool"), **kwargs)


def test_writes_while_unreachable_are_spooled_and_replayed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a SQLite store puts its default artifact root in ./mlruns
    logger = make_logger(tmp_path, f"http://127.0.0.1:{free_port()}")
    t0 = time.monotonic()
    logger.log_hyperparams({"lr": 0.1, "model": {"depth": 2}})
    for step in range(5):
        logger.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
    grid, export = tmp_path / "grid.png", tmp_path / "export"
    grid.write_bytes(b"grid v1")
    (export / "unet").mkdir(parents=True)
    (export / "unet" / "weights.bin").write_bytes(b"w" * 1000)
    logger.experiment.log_artifact(logger.run_id, str(grid), "samples")
    logger.experiment.log_artifacts(logger.run_id, str(export), "export")
    grid.write_bytes(b"grid v2, rewritten in place")  # the snapshot keeps v1
    shutil.rmtree(export)  # e.g. keep-top-k: the snapshot survives
    logger.finalize("success")
    assert time.monotonic() - t0 < 5  # probe 0.5 s + flush 1 s, no network waits
    assert logger.run_id.startswith("offline-")
    kinds = [op["kind"] for op in Spool(tmp_path / "spool").pending()]
    assert kinds[0] == "create_run" and kinds[-1] == "terminate" and kinds.count("artifact") == 2

    copy = shutil.copytree(tmp_path / "spool", tmp_path / "copy")  # the logger holds its spool
    unacked = shutil.copytree(copy, tmp_path / "unacked")  # as if a sync died before its acks
    store = f"sqlite:///{tmp_path}/store.db"
    for spool in (copy, copy, unacked):  # the replays after the first duplicate nothing
        assert sync(spool, store, wait_s=0) == 0
    client = MlflowClient(store)
    (run,) = client.search_runs(
        [client.get_experiment_by_name("unit").experiment_id],
        filter_string=f"tags.`{SPOOL_TAG}` = '{logger.run_id}'",
    )
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))
    assert history == [(s, 1.0 / (s + 1)) for s in range(5)]
    assert run.data.params == {"lr": "0.1", "model/depth": "2"}
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.runName"] == "r1"
    local = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "dl")))
    assert (local / "samples" / "grid.png").read_bytes() == b"grid v1"
    assert (local / "export" / "unet" / "weights.bin").read_bytes() == b"w" * 1000
    assert json.loads((copy / "runs.json").read_text())[store] == {logger.run_id: run.info.run_id}


@pytest.mark.slow
def test_a_run_begun_in_an_outage_reaches_the_server_once_it_is_back(tmp_path, mlflow_server):
    mlflow_server.kill()
    try:
        logger = make_logger(tmp_path, mlflow_server.uri, flush_timeout_s=60)
        logger.log_hyperparams({"lr": 0.1})
        for step in range(3):
            logger.log_metrics({"loss": float(step)}, step=step)
        provisional = logger.run_id
        assert provisional.startswith("offline-")
    finally:
        mlflow_server.start()
    for step in range(3, 6):
        logger.log_metrics({"loss": float(step)}, step=step)
    logger.finalize("success")  # waits for the sender to notice the server and drain
    assert not logger.run_id.startswith("offline-")  # the server's id, once it gave one
    client = MlflowClient(mlflow_server.uri)
    assert steps(client, logger.run_id, "loss") == dict.fromkeys(range(6), 1)
    run = client.get_run(logger.run_id)
    assert run.data.params == {"lr": "0.1"} and run.data.tags[SPOOL_TAG] == provisional
    assert run.info.status == "FINISHED"
    # Ids handed out while provisional (checkpoints, run folder) still lead to the server's run.
    assert logger.experiment.get_run(provisional).info.run_id == logger.run_id


def test_a_tracker_that_never_answers_does_not_stall_training(tmp_path, caplog):
    with socket.socket() as blackhole:  # accepts connections, never answers
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(16)
        uri = f"http://127.0.0.1:{blackhole.getsockname()[1]}"
        logger = make_logger(tmp_path, uri)
        t0 = time.monotonic()
        _ = logger.experiment  # the /health probe times out after 0.5 s
        assert time.monotonic() - t0 < 3
        assert f"MLflow tracking server {uri} is unreachable" in caplog.text
        t0 = time.monotonic()
        for step in range(200):
            logger.log_metrics({"loss": float(step)}, step=step)
        assert time.monotonic() - t0 < 2  # spooled, not sent: ~1 ms a step
        logger.finalize("success")
    assert "python -m train.cli.mlflow_sync" in caplog.text
    assert len(Spool(tmp_path / "spool").pending()) == 1 + 200 + 1  # create, metrics, status


def test_a_refused_write_is_set_aside_and_the_rest_goes_on(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = f"sqlite:///{tmp_path}/store.db"
    logger = make_logger(tmp_path, store, buffered=True, flush_timeout_s=30)
    logger.log_hyperparams({"a": 1})
    logger.log_hyperparams({"a": 2})  # MLflow params are immutable: the server refuses this
    logger.log_metrics({"loss": 0.5}, step=0)
    logger.finalize("success")
    client = MlflowClient(store)
    assert not logger.run_id.startswith("offline-")  # the store answered: a real run at once
    run = client.get_run(logger.run_id)
    assert run.data.params == {"a": "1"} and run.data.metrics == {"loss": 0.5}
    (rejected,) = (tmp_path / "spool" / "rejected.jsonl").read_text().splitlines()
    assert json.loads(rejected)["params"] == [["a", "2"]]


@pytest.mark.parametrize(
    "uri", ["http://alice:s3cret@mlflow.example:5000", "https://s3cret@mlflow.example"]
)
def test_credentials_in_the_tracking_uri_are_refused(uri, tmp_path, monkeypatch, compose, capsys):
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_USERNAME") as e:
        make_logger(tmp_path, uri)
    assert "s3cret" not in str(e.value) and "MLFLOW_TRACKING_TOKEN" in str(e.value)

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the config's default reads it
    from hydra.utils import instantiate

    cfg = compose("experiment=tiny")
    assert cfg.logger.mlflow._target_ == "train.tracking.logger.ResilientMLFlowLogger"
    assert cfg.logger.mlflow.spool_dir == f"{cfg.paths.run_dir}/mlflow_spool"
    with pytest.raises(Exception, match="MLFLOW_TRACKING_PASSWORD"):
        instantiate(cfg.logger.mlflow)

    (tmp_path / "spool").mkdir(exist_ok=True)
    (tmp_path / "spool" / "meta.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "spool"), "--tracking-uri", uri])
    assert exit_.value.code == 2 and "s3cret" not in capsys.readouterr().err


@pytest.mark.slow
def test_ldm_train_refuses_credentials_in_the_uri(tmp_path, demo_shards):
    proc = start_train(tmp_path, demo_shards, "http://bob:hunter2@127.0.0.1:5000")
    proc.wait(timeout=120)
    out = (tmp_path / "train.log").read_text()
    assert proc.returncode == 2, out[-3000:]
    assert "Config error: the MLflow tracking URI http://***@127.0.0.1:5000 holds" in out
    assert "hunter2" not in out
