"""The overrides of the fine-tuning tests' tiny runs: 4 steps at 16 px from the session's tiny
base export, big steps so that what trains moves far from its initialisation."""

from __future__ import annotations

from pathlib import Path


def finetune_overrides(
    experiment: str, root: Path, base: Path, shards: Path, *extra: str, logger: str = "none"
) -> list[str]:
    return [
        f"paths.root={root}",
        f"experiment={experiment}",
        f"model.base={base}",
        f"data.urls={shards}",
        f"logger={logger}",
        "data.resolution=16",
        "data.batch_size=4",
        "data.num_workers=0",
        "data.shuffle_buffer=16",
        "trainer.max_steps=4",
        "trainer.val_check_interval=1000",
        "trainer.enable_progress_bar=false",
        "model.optimizer.lr=1e-2",  # big steps: trained weights are far from their init
        "model.lr_scheduler.num_warmup_steps=0",
        "callbacks.checkpoint.every_n_train_steps=2",
        "callbacks.samples.every_n_steps=0",
        "callbacks.samples.num_inference_steps=2",
        "callbacks.progress=null",
        *extra,
    ]


def resumed_from_step_2(run_dir: Path, root: Path, overrides) -> tuple[dict, dict]:
    """A copy of the finished 4-step `run_dir` without its last checkpoints, resumed from its
    step-2 one under `root` (``overrides(ckpt_path)``: that run's overrides): the uninterrupted
    run's last checkpoint and the resumed run's, after checking both stop at step 4 with the
    same bit-identical weights."""
    import shutil

    import torch
    from cli_runner import run_cli

    from train.cli.train import main

    copy = root / "runs" / run_dir.name
    shutil.copytree(run_dir, copy)
    for name in ("last.ckpt", "step_0000004.ckpt"):
        (copy / "checkpoints" / name).unlink()
    proc = run_cli(main, ["ldm-train", *overrides(copy / "checkpoints" / "step_0000002.ckpt")])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ref = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    got = torch.load(copy / "checkpoints" / "last.ckpt", weights_only=False)
    assert got["global_step"] == ref["global_step"] == 4
    assert ref["state_dict"].keys() == got["state_dict"].keys()
    for k, v in ref["state_dict"].items():
        assert torch.equal(v, got["state_dict"][k]), k
    return ref, got
