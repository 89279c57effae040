"""`ldm-submit launcher=slurm` on a real one-node SLURM cluster (started for the session, stopped
by PID): a job runs to COMPLETED in accounting with its export and MLflow run; a 2-task DDP job
is preempted with USR1, checkpoints, requeues itself and resumes into the same run folder and
MLflow run with a continuous metric history."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_runner import run_env

SUBMIT = str(Path(sys.executable).parent / "ldm-submit")
pytestmark = pytest.mark.slow


def submit(slurm, root: Path, *overrides: str) -> str:
    cmd = [SUBMIT, "launcher=slurm", "launcher.cpus_per_task=1", "launcher.mem_gb=4",
           f"paths.root={root}", *overrides]  # fmt: skip
    proc = slurm.run(*cmd, env=run_env(root), check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return re.search(r"submitted: (\d+)", proc.stdout)[1]


def tiny(shards: Path, steps: int) -> list[str]:
    return ["experiment=tiny", f"data.urls={shards}", f"trainer.max_steps={steps}"]


def mlflow_run(root: Path, name: str):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert [r.info.run_name for r in runs] == [name], "one MLflow run per job"
    return client, runs[0]


def job_log(root: Path, job_id: str) -> str:
    return (root / "slurm" / f"tiny-{job_id}.out").read_text()


def test_submitted_job_completes_with_export_and_mlflow_run(
    slurm, demo_shards: Path, tmp_path: Path
) -> None:
    job_id = submit(slurm, tmp_path, *tiny(demo_shards, 4))
    slurm.wait(job_id, timeout=600)
    assert slurm.final_sacct_state(job_id) == "COMPLETED", job_log(tmp_path, job_id)[-5000:]
    run = tmp_path / "runs" / f"tiny-{job_id}"
    assert (run / "export" / "model_index.json").is_file()
    client, mlrun = mlflow_run(tmp_path, f"tiny-{job_id}")
    assert mlrun.info.status == "FINISHED"
    assert mlrun.data.tags["slurm_job_id"] == job_id
    steps = [m.step for m in client.get_metric_history(mlrun.info.run_id, "train/loss")]
    assert steps == [0, 1, 2, 3]
    assert "export" in {a.path for a in client.list_artifacts(mlrun.info.run_id)}


def wait_for(path_glob: tuple[Path, str], timeout: float) -> None:
    folder, pattern = path_glob
    deadline = time.monotonic() + timeout
    while not list(folder.glob(pattern)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {pattern} in {folder} after {timeout} s")
        time.sleep(0.2)


def test_preempted_ddp_job_requeues_and_resumes_into_the_same_run(
    slurm, demo_shards: Path, tmp_path: Path
) -> None:
    steps = 24  # USR1 comes a few steps after the step-4 checkpoint
    job_id = submit(
        slurm, tmp_path, *tiny(demo_shards, steps), "launcher.procs_per_node=2", "strategy=ddp",
        "batch.global_size=8", "callbacks.checkpoint.every_n_train_steps=4",
    )  # fmt: skip
    run = tmp_path / "runs" / f"tiny-{job_id}"
    wait_for((run / "checkpoints", "step_*.ckpt"), timeout=300)  # training is under way
    slurm.run("scancel", "--signal=USR1", job_id)
    slurm.wait(job_id, timeout=600)
    log = job_log(tmp_path, job_id)
    assert slurm.final_sacct_state(job_id) == "COMPLETED", log[-5000:]
    history = slurm.run("sacct", "-j", job_id, "-X", "-n", "-P", "-D", "-o", "State").stdout
    assert history.split()[:1] == ["REQUEUED"], history

    # The first start checkpointed at a step boundary and requeued; the second (restart count
    # 1) resumed from exactly that checkpoint, in the same run folder.
    assert f"job {job_id} start 0" in log and f"job {job_id} start 1" in log
    saved = re.search(r"Preempted at step (\d+): saved (\S+); job requeued", log)
    assert saved, log[-5000:]
    step, ckpt = int(saved[1]), Path(saved[2])
    assert ckpt == run / "hpc_ckpt_1.ckpt"
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == step
    assert 0 < step < steps
    assert f"Resuming from {ckpt}" in log
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in log  # DDP over the two srun tasks
    assert (run / "export" / "model_index.json").is_file()

    # One MLflow run; each step's loss logged once, none missing across the requeue.
    client, mlrun = mlflow_run(tmp_path, f"tiny-{job_id}")
    logged = [m.step for m in client.get_metric_history(mlrun.info.run_id, "train/loss")]
    assert sorted(logged) == list(range(steps)), logged
    assert mlrun.info.status == "FINISHED"


def test_a_saved_dry_run_script_runs_under_sbatch(slurm, tmp_path: Path) -> None:
    """`ldm-submit --dry-run > job.sbatch; sbatch job.sbatch` on a paths.root that has no log
    folder yet: the job completes and its log is where the README says. The setup line's
    environment provides a stub ldm-train (the subject is the script, not training)."""
    from cli_runner import run_cli
    from test_slurm_script import other_environment

    from jobs.submit import cli

    other, root = other_environment(tmp_path), tmp_path / "fresh-root"
    dry = run_cli(cli, [
        "ldm-submit", "launcher=slurm", "launcher.cpus_per_task=1", "launcher.mem_gb=1",
        f"launcher.setup=[source {other}/activate]", "launcher.check_paths=false",
        "experiment=tiny", f"data.urls={tmp_path}/shards", f"paths.root={root}", "--dry-run",
    ])  # fmt: skip
    assert dry.returncode == 0, dry.stderr
    assert not root.exists()  # a dry run writes nothing
    saved = tmp_path / "job.sbatch"
    saved.write_text(dry.stdout)
    job_id = slurm.run("sbatch", "--parsable", str(saved)).stdout.strip().split(";")[0]
    slurm.wait(job_id, timeout=120)
    log = (root / "slurm" / f"tiny-{job_id}.out").read_text()
    assert slurm.final_sacct_state(job_id) == "COMPLETED", log
    assert f"other ldm-train: experiment=tiny data.urls={tmp_path}/shards" in log, log


def test_evaluation_job_scores_the_checkpoints_while_the_training_writes_them(
    slurm, demo_shards: Path, tiny_clip_dir: Path, reference_16px: Path, tmp_path: Path
) -> None:
    """`ldm-submit ... --eval=...`: a one-task job beside the training job, started when it
    starts, scores each checkpoint as it is written into the training's MLflow run."""
    import json

    eval_args = (f"--reference {reference_16px} --val-urls {demo_shards} --clip-model "
                 f"{tiny_clip_dir} --num-samples 8 --steps 2 --poll-seconds 0.5")  # fmt: skip
    cmd = [SUBMIT, "launcher=slurm", "launcher.cpus_per_task=1", "launcher.mem_gb=4",
           f"paths.root={tmp_path}", *tiny(demo_shards, 150),
           "callbacks.checkpoint.every_n_train_steps=50", f"--eval={eval_args}"]  # fmt: skip
    proc = slurm.run(*cmd, env=run_env(tmp_path), check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train_id, eval_id = re.findall(r"submitted: (\d+)", proc.stdout)
    for job in (train_id, eval_id):
        slurm.wait(job, timeout=600)
    eval_log = (tmp_path / "slurm" / f"tiny-eval-{eval_id}.out").read_text()
    assert slurm.final_sacct_state(train_id) == "COMPLETED", job_log(tmp_path, train_id)[-3000:]
    assert slurm.final_sacct_state(eval_id) == "COMPLETED", eval_log[-3000:]

    run = tmp_path / "runs" / f"tiny-{train_id}"
    done = [json.loads(x) for x in (run / "eval" / "scores.jsonl").read_text().splitlines()]
    assert [(r["step"], r["source"]) for r in done] == [
        (50, "step_0000050.ckpt"), (100, "step_0000100.ckpt"), (150, "step_0000150.ckpt"),
        (150, "export")]  # fmt: skip
    client, mlrun = mlflow_run(tmp_path, f"tiny-{train_id}")
    history = client.get_metric_history(mlrun.info.run_id, "eval/fid")
    assert sorted((m.step, m.value) for m in history) == [
        (r["step"], r["scores"]["fid"]) for r in done[:3]]  # fmt: skip
    first = min(m.timestamp for m in history)
    assert first < mlrun.info.end_time, "the first checkpoint was scored while training ran"
    (version,) = client.search_model_versions(f"run_id='{mlrun.info.run_id}'")
    assert float(version.tags["eval.fid"]) == done[-1]["scores"]["fid"]
