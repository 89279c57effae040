"""Fault tests run `ldm-train` with the fault injectors importable: as a subprocess where the
fault needs a process of its own (kills), else in this process (`cli_runner`), which spares
the 8-10 s of imports a fresh process pays and runs the same entry point on the same argv."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_runner import run_cli

HERE = Path(__file__).parent
LDM_TRAIN = str(Path(sys.executable).parent / "ldm-train")


def fault_env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return env | {
        "LDM_OUTPUT_DIR": str(root),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")])),
    }


def _checked(proc: subprocess.CompletedProcess, expect: int | None):
    if expect is not None:
        assert proc.returncode == expect, proc.stderr[-4000:] + proc.stdout[-2000:]
    return proc


@pytest.fixture
def train(demo_shards: Path, tmp_path: Path):
    """`train(*overrides, expect=0)`: tiny `ldm-train` under tmp_path, run in this process;
    returns the exit code and output as `subprocess.run` would."""
    from train.cli.train import main

    def _train(*overrides: str, expect: int | None = 0) -> subprocess.CompletedProcess:
        argv = [LDM_TRAIN, "experiment=tiny", f"data.urls={demo_shards}", *overrides]
        return _checked(run_cli(main, argv, env=fault_env(tmp_path)), expect)

    return _train


@pytest.fixture
def train_process(demo_shards: Path, tmp_path: Path):
    """`train` as a subprocess of its own: for runs compared bit for bit with a killed one."""

    def _train(*overrides: str, expect: int | None = 0) -> subprocess.CompletedProcess:
        cmd = [LDM_TRAIN, "experiment=tiny", f"data.urls={demo_shards}", *overrides]
        proc = subprocess.run(cmd, env=fault_env(tmp_path), capture_output=True, text=True,
                              timeout=600)  # fmt: skip
        return _checked(proc, expect)

    return _train
