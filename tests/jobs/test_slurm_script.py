"""The rendered sbatch script on its own (no cluster): a `launcher.setup` line that activates
another environment decides which `ldm-train` runs, and the script makes its log folder."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from jobs.submit import prepare


def other_environment(root: Path) -> Path:
    """A virtualenv-like folder whose `bin/activate` puts its `bin/ldm-train` first on PATH; that
    ldm-train only says it ran (the subject is which executable the job calls, not training)."""
    bin_dir = root / "other-venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "activate").write_text(f'export PATH="{bin_dir}:$PATH"\n')
    stub = bin_dir / "ldm-train"
    stub.write_text('#!/bin/sh\necho "other ldm-train: $*"\n')
    stub.chmod(0o755)
    return bin_dir


def fake_srun(root: Path) -> Path:
    """`srun` outside an allocation: drops its options and runs the command once."""
    bin_dir = root / "fake-slurm"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text('#!/bin/sh\nwhile [ "${1#--}" != "$1" ]; do shift; done\nexec "$@"\n')
    srun.chmod(0o755)
    return bin_dir


def test_setup_lines_choose_ldm_train_and_the_script_makes_its_log_folder(tmp_path: Path) -> None:
    other = other_environment(tmp_path)
    root = tmp_path / "fresh-root"  # no slurm/ log folder yet, as for a saved --dry-run script
    launcher, job = prepare([
        "launcher=slurm", f"launcher.setup=[source {other}/activate]", "launcher.check_paths=false",
        "experiment=tiny", f"data.urls={tmp_path}/shards", f"paths.root={root}",
    ])  # fmt: skip
    script = tmp_path / "job.sbatch"
    script.write_text(launcher.render(job))
    # What the batch step gives the script; PATH without this project's environment.
    env = {"PATH": f"{fake_srun(tmp_path)}:/usr/bin:/bin", "SLURM_JOB_ID": "7",
           "SLURM_JOB_NAME": job.name, "HOME": os.environ.get("HOME", "/")}  # fmt: skip
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    log = root / "slurm" / f"{job.name}-7.out"
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = log.read_text()
    assert "other ldm-train: experiment=tiny" in text, text
    assert "run_name=tiny-7" in text and "ckpt_path=last" in text
