"""Fault tests run `ldm-train` as a subprocess, with the fault injectors importable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
LDM_TRAIN = str(Path(sys.executable).parent / "ldm-train")


def fault_env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return env | {
        "LDM_OUTPUT_DIR": str(root),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")])),
    }


@pytest.fixture
def train(demo_shards: Path, tmp_path: Path):
    """`train(*overrides, expect=0)`: tiny ldm-train under tmp_path; returns the process."""

    def _train(*overrides: str, expect: int | None = 0, **popen) -> subprocess.CompletedProcess:
        cmd = [LDM_TRAIN, "experiment=tiny", f"data.urls={demo_shards}", *overrides]
        proc = subprocess.run(cmd, env=fault_env(tmp_path), capture_output=True, text=True,
                              timeout=600, **popen)  # fmt: skip
        if expect is not None:
            assert proc.returncode == expect, proc.stderr[-4000:] + proc.stdout[-2000:]
        return proc

    return _train
