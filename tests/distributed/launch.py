"""Running `ldm-train` as two processes (torchrun, gloo) and `ldm-export` in the test process,
for the distributed tests."""

from __future__ import annotations

import sys
from pathlib import Path

from cli_runner import run_cli, run_env
from support.stacks import excerpt, run_or_dump

from train.cli.export import main as export_main

LDM_TRAIN = str(Path(sys.executable).parent / "ldm-train")
LDM_EXPORT = str(Path(sys.executable).parent / "ldm-export")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
# SGD with momentum, not Adam: Adam's g / sqrt(v) turns float rounding in near-zero gradients
# (which differs with each strategy's reduction order) into update-sized differences (~1e-4
# after 4 steps); SGD keeps them at rounding level, so comparisons can be tight.
SGD = ["model.optimizer._target_=torch.optim.SGD", "model.optimizer.lr=0.1",
       "+model.optimizer.momentum=0.9"]  # fmt: skip


def ldm_train(root: Path, *overrides: str, launcher: list[str] | None = None):
    env = run_env(root)
    cmd = [*(launcher or []), LDM_TRAIN, *overrides]
    proc = run_or_dump(cmd, env, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{excerpt(proc.stderr)}")
    return proc


def ldm_export(*args: str) -> None:
    proc = run_cli(export_main, [LDM_EXPORT, *args])
    assert proc.returncode == 0, f"ldm-export {' '.join(args)}: {proc.stderr[-3000:]}"
