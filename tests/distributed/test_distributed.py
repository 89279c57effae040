"""Scale-out on CPU processes (gloo): DDP, FSDP, FSDP2 and DeepSpeed ZeRO-2/3 train, checkpoint,
resume and export what one process with the same global batch and seed exports.

Every run is `ldm-train` itself with two processes: Lightning's launcher for DDP's first leg
(what `trainer.devices=2` does on one machine), torchrun for every other run (as jobs launch
them; both ranks import at once, where Lightning's launcher starts rank 1 only once rank 0 has
built its Trainer, ~10 s later here), the two-"node" run included. `ldm-export` runs in the
test process (`cli_runner`): its subject is the consolidation, not a process.

The optimizer is SGD with momentum (`launch.SGD` says why), so the comparison can be tight
enough to catch a wrong gradient, batch split, EMA or noise draw.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_runner import run_env
from img2dataset_env import free_port
from launch import LDM_TRAIN, SGD, TORCHRUN, ldm_export, ldm_train
from safetensors.torch import load_file

# The trained model's weights in an export, by family preset.
WEIGHTS = {"tiny": "unet/diffusion_pytorch_model.safetensors",
           "pixart_tiny": "transformer/diffusion_pytorch_model.safetensors"}  # fmt: skip
UNET = WEIGHTS["tiny"]
STEPS = 4


def common(shards: Path, experiment: str = "tiny") -> list[str]:
    return [
        f"experiment={experiment}",
        f"data.urls={shards}",
        f"data.val_urls={shards}",  # val/loss must come out the same on any world size
        "data.val_batches=100",  # all 64 samples, however the loader cuts them
        "trainer.limit_val_batches=1.0",
        "batch.global_size=8",
        f"trainer.max_steps={STEPS}",
        *SGD,
        "callbacks.samples.every_n_steps=1",  # previews gather shards mid-run too
        "callbacks/ema=default",
        "callbacks.ema.decay=0.5",  # far from the raw weights after 4 steps (asserted below)
    ]


def grad_norms(root: Path, metric: str = "train/grad_norm") -> list[tuple[int, float]]:
    """A metric's history of the one MLflow run under ``root``."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    (experiment,) = [e for e in client.search_experiments() if e.name != "Default"]
    (run,) = client.search_runs([experiment.experiment_id])
    history = client.get_metric_history(run.info.run_id, metric)
    return sorted((m.step, m.value) for m in history)


def max_diff(a_dir: Path, b_dir: Path, weights: str = UNET) -> float:
    a, b = load_file(a_dir / weights), load_file(b_dir / weights)
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def eval_args(tiny_clip_dir: Path, reference_16px: Path) -> list[str]:
    """FID, KID and CLIP score at the end of the UNet runs (tiny CLIP features, 16 px)."""
    return ["callbacks/eval=clip", f"callbacks.eval.clip_model={tiny_clip_dir}",
            f"callbacks.eval.reference={reference_16px}", "callbacks.eval.every_n_steps=0",
            "callbacks.eval.num_images=8", "callbacks.eval.num_inference_steps=2",
            "callbacks.eval.batch_size=4"]  # fmt: skip


@pytest.fixture(scope="module")
def references(demo_shards: Path, tmp_path_factory: pytest.TempPathFactory, eval_args):
    """One process per family preset, trained once for all strategies that compare to it."""
    made: dict[str, dict[str, Path]] = {}

    def get(experiment: str) -> dict[str, Path]:
        if experiment not in made:
            extra = eval_args if experiment == "tiny" else []
            made[experiment] = single_run(demo_shards, tmp_path_factory, experiment, extra)
        return made[experiment]

    return get


@pytest.fixture(scope="module")
def reference(references) -> dict[str, Path]:
    return references("tiny")


def single_run(
    demo_shards: Path, tmp_path_factory, experiment: str, extra: list[str]
) -> dict[str, Path]:
    """One process, the same global batch of 8: two micro-batches of 4 (accumulation), read by
    two loader workers, which cut the sample stream like two ranks with one reader each."""
    root = tmp_path_factory.mktemp("single")
    out = ldm_train(
        root,
        *common(demo_shards, experiment),
        "trainer.devices=1",
        "data.num_workers=2",
        "batch.max_per_device=4",
        "trainer.val_check_interval=4",  # counted in batches: every 2 optimizer steps
        "run_name=single",
        *extra,
    )
    assert "global batch 8 = 4 per device x 1 devices x 2 accumulation steps" in out.stdout
    run = root / "runs" / "single"
    ldm_export("--no-ema", "--allow-pickle", str(run / "checkpoints/last.ckpt"), str(run / "raw"))
    return {"ema": run / "export", "raw": run / "raw", "root": root}


# Every strategy for the UNet; for the transformer only strategies that shard its parameters
# (FSDP2's per-block units, ZeRO-3's gathers): DDP and ZeRO-2 keep whole parameters on every rank
# and take no family-specific path, so a PixArt run of each would repeat the UNet's (~130 s).
# FSDP's per-block units over a transformer are tested on Wan (test_video_sharded).
STRATEGY_RUNS = [
    pytest.param(strategy, experiment, id=f"{name}-{strategy}")
    for name, experiment, strategies in (
        ("unet", "tiny", ("ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp", "fsdp2")),
        ("pixart", "pixart_tiny", ("deepspeed_zero3", "fsdp2")),
    )
    for strategy in strategies
]


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "experiment"), STRATEGY_RUNS)
def test_two_processes_train_resume_and_export_like_one(
    strategy: str, experiment: str, demo_shards: Path, references, eval_args, tmp_path: Path
) -> None:
    """Train to step 2, stop, resume to step 4 from the (sharded) checkpoint; the gradient
    norms, the validation loss, the export and ldm-export's consolidation of the checkpoint all
    match one process, for a UNet and for a transformer trained by rectified flow; under DDP
    and FSDP the UNet's FID, KID and CLIP score (each rank generating half the images) too."""
    reference, weights = references(experiment), WEIGHTS[experiment]
    # EMA and raw weights must differ, or the comparisons below could not tell them apart.
    assert max_diff(reference["ema"], reference["raw"], weights) > 1e-3
    args = [*common(demo_shards, experiment), "trainer.devices=2", f"strategy={strategy}",
            "trainer.val_check_interval=2", "run_name=r"]  # fmt: skip
    # Image metrics where the weights are whole on every rank (DDP) and where rank 0 gathers
    # and broadcasts them (FSDP); ZeRO takes the same gather paths as the export.
    with_eval = experiment == "tiny" and strategy in ("ddp", "fsdp", "fsdp2")
    if with_eval:
        args += eval_args
    launcher = None if strategy == "ddp" else TORCHRUN
    # Stop at step 2 (as a preempted job would), then resume to step 4 from the checkpoint.
    first = ldm_train(tmp_path, *args, "trainer.max_steps=2", launcher=launcher)
    assert "global batch 8 = 4 per device x 2 devices x 1 accumulation steps" in first.stdout
    run = tmp_path / "runs" / "r"
    last = run / "checkpoints" / "last.ckpt"
    if strategy.startswith("deepspeed"):  # sharded: a folder, one state file per rank
        assert (last / "checkpoint").is_dir() and (last / "latest").is_file()
    elif strategy.startswith("fsdp"):
        assert {"__0_0.distcp", "__1_0.distcp", "meta.pt"} <= {p.name for p in last.iterdir()}
    ldm_train(tmp_path, *args, "ckpt_path=last", launcher=TORCHRUN)

    # Gradient norms: DDP's whole gradients, FSDP's shards summed over ranks, DeepSpeed's own.
    ours, ref = grad_norms(tmp_path), grad_norms(reference["root"])
    assert [s for s, _ in ours] == [s for s, _ in ref] == list(range(STEPS))
    assert [v for _, v in ours] == pytest.approx([v for _, v in ref], rel=1e-5)
    # Each rank scores its rows of the validation batches; sums reduced over ranks.
    ours, ref = grad_norms(tmp_path, "val/loss"), grad_norms(reference["root"], "val/loss")
    assert [s for s, _ in ours] == [s for s, _ in ref] and len(ours) == 2  # steps 2, 4
    assert [v for _, v in ours] == pytest.approx([v for _, v in ref], rel=1e-5)
    # The UNet's image metrics: each rank generated half the images, one number results. KID,
    # a difference of kernel means over a few samples, amplifies the weights' float noise from
    # the gathered shards: rel 2.1e-5 under FSDP on an Intel Xeon (AMX kernels), so 1e-4.
    metrics = {"eval/fid": 1e-5, "eval/kid": 1e-4, "eval/clip_score": 1e-5}
    for key, rel in metrics.items() if with_eval else ():
        ours, ref = grad_norms(tmp_path, key), grad_norms(reference["root"], key)
        assert [s for s, _ in ours] == [2, 4] and [s for s, _ in ref] == [4], key
        assert ours[-1][1] == pytest.approx(ref[-1][1], rel=rel, abs=1e-7), key
    previews = sorted(p.name for p in (run / "samples").iterdir())
    assert previews == ["final.png", "step_0000001.png", "step_0000003.png"]
    # The export written at the end of training (right after a validation pass, which leaves
    # FSDP's root unit unsharded) holds the EMA weights, gathered from shards.
    assert max_diff(run / "export", reference["ema"], weights) < 1e-6
    # ldm-export consolidates the sharded checkpoint to the same files, EMA or raw.
    for flag, ref in (([], "ema"), (["--no-ema"], "raw")):
        out = run / f"offline-{ref}"
        ldm_export(*flag, "--allow-pickle", str(last), str(out))
        assert max_diff(out, reference[ref], weights) < 1e-6, ref


@pytest.mark.slow
def test_two_slurm_tasks_train_like_one_process(
    slurm, demo_shards: Path, reference: dict[str, Path], tmp_path: Path
) -> None:
    """sbatch --ntasks=2 + srun: Lightning's SLURMEnvironment gives the ranks (one task per
    device); the job trains DDP and exports what one process does."""
    cmd = [LDM_TRAIN, *common(demo_shards), "trainer.devices=2", "strategy=ddp", "run_name=s"]
    job = slurm.run(
        "sbatch", "--parsable", "--job-name=ldm-ddp", "--ntasks=2", "--ntasks-per-node=2",
        "--cpus-per-task=1", "--mem=8G", f"--output={tmp_path}/slurm-%j.out",
        "--wrap", "srun " + " ".join(cmd), env=run_env(tmp_path),
    )  # fmt: skip
    job_id = job.stdout.strip()
    state = slurm.wait(job_id, timeout=600)
    log = (tmp_path / f"slurm-{job_id}.out").read_text()
    assert state == "COMPLETED", log[-5000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in log
    assert max_diff(tmp_path / "runs" / "s" / "export", reference["ema"]) < 1e-6
    assert (tmp_path / "runs" / "s" / "ldm-train-rank1.log").is_file()


@pytest.mark.slow
def test_zero3_with_cpu_offload_trains_and_consolidates(demo_shards: Path, tmp_path: Path) -> None:
    """ZeRO-3 with parameters and optimizer state offloaded (DeepSpeed's CPU Adam, compiled on
    first use): the export gathered at the end equals ldm-export's offline consolidation."""
    args = [a for a in common(demo_shards) if not a.startswith(("model.optimizer", "+model"))]
    offload = ["trainer.devices=2", "strategy=deepspeed_zero3_offload", "run_name=o"]
    ldm_train(tmp_path, *args, *offload, launcher=TORCHRUN)
    run = tmp_path / "runs" / "o"
    out = run / "offline"
    ldm_export("--allow-pickle", str(run / "checkpoints/last.ckpt"), str(out))
    assert max_diff(run / "export", out) < 1e-6
    weights = load_file(out / UNET)
    assert all(torch.isfinite(w).all() for w in weights.values())


def wait_all(procs: list[subprocess.Popen], timeout: float) -> None:
    """Wait for every process; once one fails (or time runs out) stop the others by PID, as a
    peer left alone would wait at the rendezvous until its own timeout."""
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
        failed = any(p.poll() not in (None, 0) for p in procs)
        if failed or time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    os.kill(p.pid, signal.SIGKILL)
            break
        time.sleep(0.5)
    for p in procs:
        p.wait()


@pytest.mark.slow
def test_two_nodes_through_torchrun_rendezvous(
    demo_shards: Path, reference: dict[str, Path], tmp_path: Path
) -> None:
    """trainer.num_nodes=2: two torchrun agents (one per "node", one process each) meet at a
    c10d rendezvous on 127.0.0.1, as Kubernetes pods do; one run dir, one MLflow run. The
    strategy is FSDP2's HSDP (shards within a node, replicas across nodes: here a node's one
    process holds whole parameters and the nodes reduce gradients like DDP)."""
    port = free_port()
    torchrun = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=twonodes",
    ]  # fmt: skip
    args = [
        *common(demo_shards),
        "trainer.num_nodes=2",
        "trainer.devices=1",
        "strategy=fsdp2",
        "strategy.replicate_across_nodes=true",
        "run_name=nodes",
    ]
    env = run_env(tmp_path)
    logs = [(tmp_path / f"node{i}.out", tmp_path / f"node{i}.err") for i in range(2)]
    procs = [
        subprocess.Popen(
            [*torchrun, LDM_TRAIN, *args], env=env, stdout=o.open("w"), stderr=e.open("w")
        )
        for o, e in logs
    ]
    wait_all(procs, timeout=600)
    outs = [(o.read_text(), e.read_text()) for o, e in logs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-5000:]
    assert sum("global batch 8 = 4 per device x 2 devices" in o for o, _ in outs) == 1
    units = "units of UNet2DConditionModel over replicate 2 x shard 1"
    assert sum(units in o + e for o, e in outs) == 1, outs[0][0][-3000:]

    run = tmp_path / "runs" / "nodes"
    assert max_diff(run / "export", reference["ema"]) < 1e-6
    # Rank 0 alone wrote the run's metadata; rank 1 logged to its own file.
    assert (run / ".hydra" / "config.yaml").is_file()
    assert (run / "ldm-train-rank1.log").is_file()
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["nodes"]  # no per-rank dirs

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, "both nodes log into one MLflow run"
    params = runs[0].data.params
    assert params["batch/derived/world_size"] == "2"
    assert params["trainer/num_nodes"] == "2"
    assert "export" in {a.path for a in client.list_artifacts(runs[0].info.run_id)}


def test_a_global_batch_that_does_not_split_fails_before_training(
    demo_shards: Path, tmp_path: Path
) -> None:
    env = run_env(tmp_path)
    cmd = [LDM_TRAIN, "experiment=tiny", f"data.urls={demo_shards}", "logger=none"]
    cmd += ["trainer.devices=2", "strategy=ddp", "batch.global_size=9"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "batch.global_size=9 does not split evenly over 2 devices" in proc.stderr
    assert "use a multiple of 2, e.g. 8 or 10" in proc.stderr
    assert not (tmp_path / "runs" / "tiny" / "checkpoints").exists()


def test_unshardable_module_is_refused_before_training(demo_shards: Path, tmp_path: Path) -> None:
    """The autoencoder stage has no gather path for previews/exports: ZeRO-3 is refused with
    the strategies that work, instead of rank 0 hanging over shards at the first preview."""
    cmd = [LDM_TRAIN, "experiment=tiny", "model=autoencoder", "~model.backbone", "logger=none"]
    cmd += [f"data.urls={demo_shards}", "trainer.devices=2", "strategy=deepspeed_zero3"]
    proc = subprocess.run(cmd, env=run_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "use strategy=ddp, deepspeed_zero1 or deepspeed_zero2" in proc.stderr


def test_zero3_partition_round_trip() -> None:
    """How ZeRO-3 slices a parameter (flat, zero-padded, equal pieces in rank order): what
    offline export of EMA shards relies on."""
    from train.distributed.sharding import zero3_partition, zero3_unpartition

    whole = torch.arange(10.0).reshape(2, 5)
    shards = [zero3_partition(whole, r, 4) for r in range(3)]  # 12 slots, 2 padding zeros
    assert [s.tolist() for s in shards] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 0]]
    assert torch.equal(zero3_unpartition(shards, [2, 5]), whole)
