"""ldm-submit: rendered jobs (golden files), Kubernetes manifests against the real schemas, bad
settings refused before submission, and the pod's torchrun command training on this machine."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import k8s_schema
import pytest
import torch
import yaml
from img2dataset_env import free_port
from support.stacks import FAULT_ENV, abort_each, excerpt

from jobs.launcher import SubmitError, dns_name, user_overrides
from jobs.submit import main, prepare

GOLDEN = Path(__file__).parent / "golden"
BIN = str(Path(sys.executable).parent)
TRAIN = ["experiment=tiny", "data.urls='/shared/data/{00000..00009}.tar'", "batch.global_size=32"]
CASES = {
    "slurm.sbatch": [
        "launcher=slurm", "launcher.nodes=2", "launcher.gpus_per_node=4", "launcher.time=2:00:00",
        "launcher.partition=gpu", "launcher.account=vision", "launcher.train_command=ldm-train",
        "launcher.setup=[source /opt/venv/bin/activate]", "+launcher.env.HF_HUB_OFFLINE=1",
    ],
    "slurm_container.sbatch": [
        "launcher=slurm", "launcher.gpus_per_node=8", "launcher.container_image='nvcr.io#ldm:0.1'",
        "launcher.container_mounts=[/lustre:/lustre]", "launcher.signal_seconds=300",
    ],
    "pytorchjob.yaml": [
        "launcher=k8s", "launcher.nodes=2", "launcher.gpus_per_node=4",
        "launcher.mlflow_tracking_uri=https://mlflow.example.com", "launcher.mlflow_secret=mlflow",
        "launcher.node_selector={nvidia.com/gpu.product: H100}",
        "launcher.tolerations=[{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]",
    ],
    "jobset.yaml": ["launcher=k8s_jobset", "launcher.nodes=4", "launcher.gpus_per_node=8"],
    "indexed_job.yaml": ["launcher=k8s_job", "launcher.nodes=2", "launcher.gpus_per_node=2"],
    "local.sh": ["launcher=local", "launcher.procs_per_node=2"],
}  # fmt: skip
COMMON = [
    "launcher.job_name=golden", "paths.root=/shared/outputs", "+launcher.image=reg/ldm:0.1",
    "launcher.check_paths=false",  # /shared is the cluster's, not this machine's
]  # fmt: skip


def render(name: str) -> str:
    extra = [o for o in COMMON if "image" not in o or "k8s" in CASES[name][0]]
    launcher, job = prepare([*CASES[name], *TRAIN, *extra])
    return launcher.render(job).replace(BIN, "<venv>/bin")


@pytest.mark.parametrize("name", sorted(CASES))
def test_rendered_jobs_match_golden_files(name: str) -> None:
    """Set UPDATE_GOLDEN=1 to rewrite them; review the diff like code."""
    text = render(name)
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert text == path.read_text()


@pytest.mark.parametrize("launcher", ["k8s", "k8s_jobset", "k8s_job"])
@pytest.mark.parametrize(
    "resources",
    [
        ["launcher.nodes=1", "launcher.gpus_per_node=0", "launcher.procs_per_node=2"],
        ["launcher.nodes=2", "launcher.gpus_per_node=8", "launcher.mlflow_secret=creds"],
    ],
)
def test_every_kubernetes_manifest_validates_against_the_real_schemas(
    launcher: str, resources: list[str]
) -> None:
    overrides = [f"launcher={launcher}", "+launcher.image=reg/ldm:0.1", *resources, *TRAIN]
    launcher_obj, job = prepare(overrides)
    docs = k8s_schema.load_yaml_documents(launcher_obj.render(job))
    assert docs and k8s_schema.validate_all(docs) == []
    for doc in docs:
        for pod in pod_specs(doc):
            assert pod["securityContext"]["runAsNonRoot"] is True
            (container,) = pod["containers"]
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert "ckpt_path=last" in container["command"]  # restarted pods resume


def test_golden_manifests_themselves_validate() -> None:
    for name in ("pytorchjob.yaml", "jobset.yaml", "indexed_job.yaml"):
        docs = k8s_schema.load_yaml_documents((GOLDEN / name).read_text())
        assert k8s_schema.validate_all(docs) == [], name


def test_mlflow_credentials_come_from_the_secret_by_reference() -> None:
    launcher, job = prepare(
        ["launcher=k8s", "+launcher.image=i", "launcher.mlflow_secret=creds", *TRAIN]
    )
    (doc,) = yaml.safe_load_all(launcher.render(job))
    (pod,) = pod_specs(doc)
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        assert "value" not in env[key]
        ref = {"name": "creds", "key": key, "optional": True}
        assert env[key]["valueFrom"]["secretKeyRef"] == ref
    with pytest.raises(SubmitError, match="mlflow_secret"):
        prepare(["launcher=k8s", "+launcher.image=i", *TRAIN,
                 "launcher.mlflow_tracking_uri=https://me:hunter2@mlflow.example.com"])  # fmt: skip


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([], "choose where the job runs: launcher=slurm"),
        (["launcher=k8s"], "launcher.image is not set"),
        (["launcher=slurm", "trainer.devices=2"], "the launcher sets trainer.devices"),
        (["launcher=slurm", "launcher.time=forever"], "launcher.time='forever' is not a SLURM"),
        (["launcher=slurm", "+launcher.gpus=2"], "launcher.gpus"),
        (["launcher=slurm", "launcher.procs_per_node=3"], "batch.global_size=32 does not split"),
        (["launcher=nope"], "launcher"),
    ],
)
def test_bad_settings_fail_before_anything_is_submitted(
    overrides: list[str], message: str, tmp_path: Path, capsys
) -> None:
    # /shared is the cluster's filesystem, not this machine's: only SLURM would check it here.
    unchecked = ["launcher.check_paths=false"] if "launcher=slurm" in overrides else []
    rc = main([*overrides, *unchecked, *TRAIN, f"paths.root={tmp_path}"])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "jobs").exists()


def test_launcher_keys_stay_out_of_the_training_command() -> None:
    kept = user_overrides(["launcher=slurm", "launcher.nodes=2", "+launcher.env.A=1", "seed=3",
                           "paths.root=/x", "run_name=r", "trainer.max_steps=9"])  # fmt: skip
    assert kept == ["seed=3", "trainer.max_steps=9"]
    assert dns_name("Demo_Run.2026/11") == "demo-run-2026-11"
    assert dns_name("42") == "ldm-42"


@pytest.mark.parametrize("kind", ["k8s", "k8s_jobset", "k8s_job"])
def test_long_run_names_keep_a_unique_job_name(kind: str) -> None:
    """Two submissions of one long run name are two jobs and two runs: the run name is cut to
    fit, never the time stamp (a shared name would make the second resume the first)."""
    long_name = "a-very-long-experiment-name-for-the-laion-aesthetics-finetune"
    launcher, _ = prepare([f"launcher={kind}", "+launcher.image=i", "launcher.check_paths=false",
                           f"run_name={long_name}", *TRAIN])  # fmt: skip
    first = launcher.names(long_name, "20261201-101500")
    second = launcher.names(long_name, "20261201-101501")
    assert first != second
    for job, run in (first, second):
        assert job == run and len(job) <= 40 and re.fullmatch(r"[a-z][a-z0-9-]*[a-z0-9]", job)
    assert first[0].startswith("a-very-long") and first[0].endswith("-20261201-101500")


def pod_specs(doc: dict) -> list[dict]:
    if doc["kind"] == "PyTorchJob":
        return [r["template"]["spec"] for r in doc["spec"]["pytorchReplicaSpecs"].values()]
    if doc["kind"] == "JobSet":
        return [r["template"]["spec"]["template"]["spec"] for r in doc["spec"]["replicatedJobs"]]
    if doc["kind"] == "Job":
        return [doc["spec"]["template"]["spec"]]
    return []


def kubelet_expand(args: list[str], env: dict[str, str]) -> list[str]:
    """`$(VAR)` in a container's command, expanded as the kubelet does from the pod's env."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), a) for a in args]


def master_pod(root: Path, shards: Path, name: str, steps: int, *overrides: str):
    """The PyTorchJob master pod's container command for a 2-process CPU DDP run of `steps`
    steps, expanded with the env the operator gives that pod, and the env to run it in."""
    port = free_port()
    launcher, job = prepare([
        "launcher=k8s", "+launcher.image=i", "launcher.gpus_per_node=0",
        "launcher.procs_per_node=2", f"launcher.output_dir={root}", f"launcher.job_name={name}",
        f"launcher.master_port={port}", "experiment=tiny", f"data.urls={shards}",
        "batch.global_size=8", "strategy=ddp", f"trainer.max_steps={steps}", *overrides,
    ])  # fmt: skip
    (doc,) = yaml.safe_load_all(launcher.render(job))
    (pod,) = pod_specs(doc)
    operator_env = {"RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    command = kubelet_expand(pod["containers"][0]["command"], operator_env)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env |= operator_env | {"PATH": f"{BIN}:{env['PATH']}", "OMP_NUM_THREADS": "1"}
    return command, env


def loss_steps(root: Path, experiment: str = "tiny") -> tuple[list[int], str]:
    """The steps of the one MLflow run's train/loss history (in step order), and its status."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    (mlrun,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    history = client.get_metric_history(mlrun.info.run_id, "train/loss")
    return sorted(m.step for m in history), mlrun.info.status


@pytest.mark.slow
def test_sigterm_to_the_pods_processes_checkpoints_and_the_restart_continues_from_there(
    demo_shards: Path, tmp_path: Path
) -> None:
    """Kubernetes stops a pod (drain, preemption, eviction) with SIGTERM to every process in
    the container, torchrun, its ranks and their DataLoader workers alike, then SIGKILL after
    the grace period. The ranks checkpoint at the next step boundary and exit 143; the restarted
    pod resumes from that step into the same run folder and MLflow run: every step is in the
    run's loss history exactly once. (A SIGKILL, where no handler runs, resumes from the newest
    periodic checkpoint: tests/faults.)"""
    steps = 10
    command, env = master_pod(tmp_path, demo_shards, "term", steps,
                              "callbacks.checkpoint.every_n_train_steps=1000",  # none periodic
                              "data.num_workers=1",  # workers get the group's SIGTERM too
                              "callbacks.samples.every_n_steps=4",
                              "callbacks.samples.num_inference_steps=1")  # fmt: skip
    run = tmp_path / "runs" / "term"
    first = subprocess.Popen(command, env=env | FAULT_ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not (run / "samples" / "step_0000004.png").exists() and first.poll() is None:
            if time.monotonic() > deadline:  # every process's stacks (faulthandler), then fail
                abort_each(first.pid)
                out, _ = first.communicate(timeout=30)
                raise AssertionError(
                    f"hung for 300 s before the step 4 preview; stacks:\n{excerpt(out, 3000)}")
            time.sleep(0.1)
        os.killpg(first.pid, signal.SIGTERM)  # what the container runtime sends
        out, _ = first.communicate(timeout=120)  # well within the default 30 s grace + a start
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode != 0, out[-3000:]  # a pod that exits 0 would count as completed
    assert "DataLoader worker" not in out, out[-3000:]
    saved = torch.load(run / "hpc_ckpt_1.ckpt", weights_only=True)["global_step"]
    assert 4 <= saved < steps, out[-3000:]
    assert f"SIGTERM received: saved {run / 'hpc_ckpt_1.ckpt'} at step {saved}" in out
    assert not (run / "export").exists()  # the resumed run exports at its real end
    logged, status = loss_steps(tmp_path)
    assert logged == list(range(saved)) and status == "KILLED"

    kept = {str(p): torch.load(p, weights_only=True)["global_step"]
            for p in [run / "hpc_ckpt_1.ckpt", *run.glob("checkpoints/*.ckpt")]}  # fmt: skip

    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "global batch 8 = 4 per device x 2 devices x 1 accumulation steps" in out
    resumed_from = re.search(r"Resuming from (\S+)", out)
    assert resumed_from and kept.get(resumed_from[1]) == saved, out[-3000:]
    assert (run / "export" / "model_index.json").is_file()
    assert (run / "ldm-train-rank1.log").is_file()  # two ranks, one run folder
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == steps
    logged, status = loss_steps(tmp_path)
    assert logged == list(range(steps)) and status == "FINISHED"  # each step exactly once
