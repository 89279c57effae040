"""Secrets in the environment never reach params, tags, configs, checkpoints, artifacts or job
files: every byte a run and ldm-submit write is searched for them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import fault_env

SECRETS = {
    "MY_API_TOKEN": "tok-7f3c9a1b2e4d",
    "HF_TOKEN": "hf_q8w7e6r5t4y3",
    "MLFLOW_TRACKING_PASSWORD": "pw-9d8e7f6a5b4c",
}
SUBMIT = str(Path(sys.executable).parent / "ldm-submit")


def files_holding(root: Path, needles: list[str]) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            hits += [f"{path}: {n}" for n in needles if n.encode() in data]
    return hits


@pytest.mark.slow
def test_a_run_records_no_secret_anywhere(train, tmp_path: Path, monkeypatch) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    train("trainer.max_steps=2", "callbacks.checkpoint.every_n_train_steps=1",
          "+logger.mlflow.tags.api_key=${oc.env:MY_API_TOKEN}",
          "+logger.mlflow.tags.note=hub-${oc.env:HF_TOKEN}")  # fmt: skip
    assert files_holding(tmp_path, list(SECRETS.values())) == []  # mlflow.db, ckpts, artifacts

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert run.data.tags["api_key"] == "***"  # redacted, not dropped
    assert run.data.tags["note"] == "hub-***"
    assert (tmp_path / "runs" / "tiny" / "export" / "model_index.json").is_file()


def test_a_literal_secret_on_the_command_line_is_refused(train, tmp_path: Path) -> None:
    proc = train("+logger.mlflow.tags.api_key=tok-typed-in-clear", expect=2)
    assert "puts a secret on the command line" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_job_files_carry_secrets_by_reference_only(tmp_path: Path, demo_shards: Path) -> None:
    env = fault_env(tmp_path) | SECRETS

    def submit(*args: str) -> subprocess.CompletedProcess:
        cmd = [SUBMIT, "--dry-run", "experiment=tiny", f"data.urls={demo_shards}",
               f"paths.root={tmp_path}", *args]  # fmt: skip
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)

    refused = submit("launcher=slurm", f"+launcher.env.HF_TOKEN={SECRETS['HF_TOKEN']}")
    assert refused.returncode == 2 and "launcher.env.HF_TOKEN looks like a secret" in refused.stderr
    refused = submit("launcher=slurm", "+logger.mlflow.tags.api_key=tok-literal-123")
    assert refused.returncode == 2 and "would write a secret into the job file" in refused.stderr

    k8s = submit("launcher=k8s", "+launcher.image=i", "+launcher.secret_env.HF_TOKEN=hf/token",
                 "+logger.mlflow.tags.api_key=${oc.env:MY_API_TOKEN}")  # fmt: skip
    assert k8s.returncode == 0, k8s.stderr
    assert "secretKeyRef:\n                  name: hf\n                  key: token" in k8s.stdout
    slurm = submit("launcher=slurm", "+logger.mlflow.tags.api_key=${oc.env:MY_API_TOKEN}")
    assert slurm.returncode == 0, slurm.stderr
    for text in (k8s.stdout, slurm.stdout):
        assert not [v for v in SECRETS.values() if v in text]
