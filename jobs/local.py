"""This machine: `torchrun` with one process per GPU (or `procs_per_node` CPU processes)."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

from jobs.launcher import Job, Launcher, SubmitError, local_command


class LocalLauncher(Launcher):
    """The same command a pod runs, on one node with a local rendezvous; `submit` runs it in
    the foreground (a shell script, so it can be rerun as is)."""

    def __init__(self, **resources) -> None:
        super().__init__(**resources)
        if self.nodes != 1:
            raise SubmitError(f"launcher.nodes={self.nodes}: the local launcher runs one node")

    def filename(self, job: Job) -> str:
        return f"{job.name}.sh"

    def render(self, job: Job) -> str:
        cmd = [
            local_command("torchrun"), "--standalone", "--nnodes=1",
            f"--nproc-per-node={self.procs}", "--no-python", local_command("ldm-train"),
            *self.train_args(job),
        ]  # fmt: skip
        quoted = " \\\n  ".join(shlex.quote(c) for c in cmd)
        return "\n".join(["#!/bin/bash", "set -euo pipefail", *self.export_lines(), quoted]) + "\n"

    def submit(self, job: Job, path: Path) -> str:
        rc = subprocess.run(["bash", str(path)], check=False).returncode
        if rc != 0:
            raise SubmitError(f"the local job {path} exited with {rc}")
        return f"finished: {path}"
