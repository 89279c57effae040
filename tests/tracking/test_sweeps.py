"""Hydra sweeps of `ldm-train -m`: Optuna over the tiny experiment, locally (basic launcher) and
as SLURM job arrays (submitit launcher on the session's local cluster). Each sweep is one MLflow
parent run whose children are the trials, with the best trial tagged on the parent, and the
Optuna study in SQLite holds the same values the children logged."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from cli_runner import run_cli
from omegaconf import OmegaConf

from train.tracking.sweep import (
    PARENT_TAG,
    TRIAL_TAG,
    best_run,
    best_tags,
    check_scored,
    make_sqlite_folder,
    sweep_params,
    sweep_tags,
    task_overrides,
)

LDM_TRAIN = str(Path(sys.executable).parent / "ldm-train")
TRIALS = 4
STEPS = 2


def sweep(root: Path, shards: Path, *overrides: str, env: dict[str, str] | None = None) -> str:
    """`ldm-train -m` of the tiny experiment, trained on one demo shard and scored on the other,
    with everything (MLflow and Optuna stores included) under ``root``; returns its output."""
    base = {k: v for k, v in (env or os.environ).items() if k != "MLFLOW_TRACKING_URI"}
    run_env = base | {"LDM_OUTPUT_DIR": str(root), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [
        LDM_TRAIN, "-m", *overrides, "experiment=tiny", f"data.urls={shards}/shapes-000000.tar",
        f"data.val_urls={shards}/shapes-000001.tar", f"trainer.max_steps={STEPS}",
        f"hydra.sweeper.n_trials={TRIALS}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=run_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stderr[-5000:]}"
    return proc.stdout + proc.stderr


def check_sweep(root: Path) -> tuple[object, list]:
    """One parent run with TRIALS finished children, the best tagged on the parent, and the
    Optuna study's trials equal to the children; returns (parent, children by trial)."""
    import optuna
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    children = [r for r in runs if r.data.tags.get(PARENT_TAG) == parent.info.run_id]
    assert len(runs) == TRIALS + 1 and len(children) == TRIALS, "every trial a child, no others"
    children.sort(key=lambda r: int(r.data.tags[TRIAL_TAG]))
    assert [r.data.tags[TRIAL_TAG] for r in children] == [str(i) for i in range(TRIALS)]
    assert len({r.info.run_name for r in children}) == TRIALS, "each trial its own run folder"
    assert all(r.info.status == "FINISHED" for r in [parent, *children])
    losses = [r.data.metrics["val/loss"] for r in children]
    assert len(set(losses)) == TRIALS, "trials with different settings score differently"

    best = min(range(TRIALS), key=losses.__getitem__)
    tags = parent.data.tags
    assert tags["best_run_id"] == children[best].info.run_id
    assert tags["best_trial"] == str(best)
    assert float(tags["best_val/loss"]) == losses[best] == min(losses)
    chosen = dict(o.split("=", 1) for o in tags["best_overrides"].split())
    assert set(chosen) == {"model.optimizer.lr", "model.lr_scheduler.num_warmup_steps"}
    best_params = children[best].data.params
    assert float(chosen["model.optimizer.lr"]) == float(best_params["model/optimizer/lr"])

    params = parent.data.params
    storage = f"sqlite:///{root}/optuna.db"
    assert params["sweep.sweeper.storage"] == storage
    assert params["sweep.sweeper.n_trials"] == str(TRIALS)
    assert params["sweep.direction"] == "minimize" and params["sweep.metric"] == "val/loss"
    assert "interval" in params["sweep.sweeper.params.model.optimizer.lr"]

    study = optuna.load_study(study_name=params["sweep.sweeper.study_name"], storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * TRIALS
    for trial, child in zip(study.trials, children, strict=True):
        assert trial.value == pytest.approx(child.data.metrics["val/loss"], rel=1e-6)
        lr = float(child.data.params["model/optimizer/lr"])
        assert trial.params["model.optimizer.lr"] == pytest.approx(lr, rel=1e-9)
    assert study.best_value == pytest.approx(losses[best], rel=1e-6)
    check_trials_keep_only_their_weights(root, client, parent, children[best])
    return parent, children


def check_trials_keep_only_their_weights(root: Path, client, parent, best) -> None:
    """Trials write no export and upload none; each keeps its last checkpoint, and the parent
    names the one command that exports the best trial's."""
    import torch
    from safetensors.torch import load_file

    from train.cli.export import main as ldm_export

    for run_dir in (root / "runs").iterdir():
        assert sorted(p.name for p in run_dir.glob("checkpoints/*")) == ["last.ckpt"]
        assert not (run_dir / "export").exists()
    runs = client.search_runs([parent.info.experiment_id])
    assert not any(client.list_artifacts(r.info.run_id, "export") for r in runs)

    command = parent.data.tags["best_export_command"].split()
    ckpt = root / "runs" / best.info.run_name / "checkpoints" / "last.ckpt"
    out = root / "exports" / best.info.run_name
    assert command == ["ldm-export", str(ckpt), str(out)]
    assert parent.data.tags["best_checkpoint"] == str(ckpt)
    assert run_cli(ldm_export, command).returncode == 0
    exported = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    trained = torch.load(ckpt, weights_only=True)["state_dict"]
    assert exported
    assert all(torch.equal(w, trained[f"backbone.model.{k}"]) for k, w in exported.items())


@pytest.mark.slow
def test_optuna_sweep_on_cpu_is_a_parent_run_with_four_children(demo_shards, tmp_path) -> None:
    sweep(tmp_path, demo_shards, "sweep=optuna_lr")
    _, children = check_sweep(tmp_path)
    assert not any("slurm_job_id" in r.data.tags for r in children)


@pytest.mark.slow
def test_optuna_sweep_through_submitit_on_slurm(slurm, demo_shards, tmp_path) -> None:
    out = sweep(
        tmp_path, demo_shards, "sweep=optuna_lr_slurm", "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.mem_gb=4", "hydra.launcher.timeout_min=10", env=slurm.env,
    )  # fmt: skip
    assert "Submitit 'slurm' sweep output dir" in out
    parent, children = check_sweep(tmp_path)
    assert parent.data.params["sweep.launcher._target_"].endswith("SlurmLauncher")
    # One job array of all trials (n_jobs=4), task i running trial i.
    assert len({r.data.tags["slurm_array_job_id"] for r in children}) == 1
    assert [r.data.tags["slurm_array_task_id"] for r in children] == [str(i) for i in range(4)]
    for child in children:
        assert slurm.final_sacct_state(child.data.tags["slurm_job_id"]) == "COMPLETED"


# Fast checks of the pieces, without training.


def fake_run(trial: int, loss: float | None, status: str = "FINISHED") -> SimpleNamespace:
    metrics = {} if loss is None else {"val/loss": loss}
    overrides = f"experiment=tiny\nmodel.optimizer.lr={trial}"
    tags = {TRIAL_TAG: str(trial), "sweep.overrides": overrides}
    info = SimpleNamespace(run_id=f"run{trial}", run_name=f"t-{trial}", status=status)
    return SimpleNamespace(info=info, data=SimpleNamespace(metrics=metrics, tags=tags))


def test_best_run_follows_the_direction_and_skips_unfinished_runs() -> None:
    runs = [fake_run(0, 0.5), fake_run(1, 0.2, "FAILED"), fake_run(2, None), fake_run(3, 0.3),
            fake_run(4, 0.9), fake_run(5, 0.3)]  # fmt: skip
    assert best_run(runs, "val/loss", "minimize").info.run_id == "run3"  # tie: lower trial
    assert best_run(runs, "val/loss", "maximize").info.run_id == "run4"
    assert best_run(runs[1:3], "val/loss", "minimize") is None
    with pytest.raises(ValueError, match="direction"):
        best_run(runs, "val/loss", "min")


def test_best_tags_name_only_the_overrides_the_sweep_chose() -> None:
    tags = best_tags(fake_run(3, 0.25), "val/loss", {"experiment=tiny"})
    assert tags == {
        "best_run_id": "run3",
        "best_run_name": "t-3",
        "best_trial": "3",
        "best_val/loss": "0.25",
        "best_overrides": "model.optimizer.lr=3",
    }


def test_no_sweep_tags_outside_a_sweep_trial(monkeypatch) -> None:
    monkeypatch.setenv("LDM_SWEEP_PARENT_RUN_ID", "abc")  # inherited, but not a Hydra trial
    assert sweep_tags() == {}


def test_sweep_configs_compose(tmp_path) -> None:
    from hydra import compose, initialize_config_dir

    from train.config.compose import CONFIG_DIR

    overrides = [f"paths.root={tmp_path}", "experiment=tiny"]
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        local = compose("train", [*overrides, "sweep=optuna_lr"], return_hydra_config=True)
        grid = compose("train", [*overrides, "sweep=grid_lr"], return_hydra_config=True)
        slurm = compose("train", [*overrides, "sweep=optuna_lr_slurm"], return_hydra_config=True)
    for cfg in (local, grid, slurm):
        assert cfg.optimized_metric == "val/loss"
        assert cfg.trainer.val_check_interval == cfg.trainer.max_steps
        assert cfg.hydra.callbacks.mlflow_sweep._target_ == "train.tracking.sweep.MLflowSweep"
        assert cfg.data.val_urls is None  # the user's held-out shards; checked when it starts
    assert local.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert local.hydra.sweeper.storage == f"sqlite:///{tmp_path}/optuna.db"
    assert local.hydra.sweeper.study_name == "tiny" and local.hydra.sweeper.n_jobs == 1
    assert grid.hydra.sweeper._target_.endswith("BasicSweeper")
    assert slurm.hydra.launcher._target_.endswith("SlurmLauncher")
    assert slurm.hydra.launcher.submitit_folder.startswith(slurm.hydra.sweep.dir)
    assert slurm.hydra.sweep.dir.startswith(f"{tmp_path}/multirun/tiny/")
    params = sweep_params(local, "val/loss", "minimize")
    assert params["sweep.sweeper.storage"] == f"sqlite:///{tmp_path}/optuna.db"
    assert params["sweep.sweeper.params.model.optimizer.lr"] == "tag(log, interval(1e-5, 1e-2))"
    assert params["sweep.overrides"] == f"paths.root={tmp_path} experiment=tiny sweep=optuna_lr"


def test_recorded_overrides_hide_secrets() -> None:
    assert task_overrides(["experiment=tiny", "+hf_token=abcdefgh"]) == [
        "experiment=tiny",
        "+hf_token=***",
    ]


def test_a_sweep_without_validation_data_is_refused(tmp_path) -> None:
    cfg = OmegaConf.create({"data": {"val_urls": "???"}})
    with pytest.raises(ValueError, match=r"data\.val_urls"):
        check_scored(cfg, "val/loss")
    with pytest.raises(ValueError, match="optimized_metric"):
        check_scored(OmegaConf.create({"data": {"val_urls": "x"}}), None)
    check_scored(OmegaConf.create({"data": {"val_urls": "x"}}), "val/loss")
    make_sqlite_folder(f"sqlite:///{tmp_path}/a/b/optuna.db")
    assert (tmp_path / "a" / "b").is_dir()
