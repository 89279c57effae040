"""SLURM: an sbatch script with one task per GPU, `srun ldm-train`, requeue on preemption."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

from jobs.launcher import Job, Launcher, SubmitError, local_command

TIME = re.compile(r"^(\d+-)?\d+(:\d{2}){0,2}$|^\d+-\d+$")


class SlurmLauncher(Launcher):
    """`sbatch` job: `--ntasks-per-node` = GPUs per node (or `procs_per_node` on CPU nodes);
    Lightning's SLURM environment turns the srun tasks into ranks.

    With `requeue`, SLURM sends `signal_name` `signal_seconds` before the time limit (or when a
    preemption is announced); the training run then checkpoints and requeues itself
    (train/preemption.py), and the requeued job (same SLURM_JOB_ID) resumes into the same run
    folder and MLflow run.
    """

    def __init__(
        self,
        time: str = "01:00:00",
        partition: str | None = None,
        account: str | None = None,
        qos: str | None = None,
        requeue: bool = True,
        signal_name: str = "USR1",
        signal_seconds: int = 120,
        container_image: str | None = None,
        container_mounts: list[str] | None = None,
        setup: list[str] | None = None,
        sbatch_extra: list[str] | None = None,
        train_command: str | None = None,
        **resources,
    ) -> None:
        super().__init__(**resources)
        if not TIME.match(str(time)):
            raise SubmitError(
                f"launcher.time={time!r} is not a SLURM time; use minutes, HH:MM:SS or D-HH:MM:SS"
            )
        self.time, self.partition, self.account, self.qos = str(time), partition, account, qos
        self.requeue, self.signal_name, self.signal_seconds = requeue, signal_name, signal_seconds
        self.container_image = container_image
        self.container_mounts = list(container_mounts or [])
        self.setup, self.sbatch_extra = list(setup or []), list(sbatch_extra or [])
        # Inside a container the image's ldm-train; outside, this environment's.
        self.train_command = train_command or (
            "ldm-train" if container_image else local_command("ldm-train")
        )

    def names(self, run_name: str, stamp: str) -> tuple[str, str]:
        # The job id makes each submission's run name unique; a requeue keeps it.
        return self.job_name or run_name, run_name

    def filename(self, job: Job) -> str:
        return f"{job.name}.sbatch"

    def directives(self, job: Job) -> list[str]:
        opts = {
            "job-name": job.name,
            "nodes": self.nodes,
            "ntasks-per-node": self.procs,
            "gpus-per-node": self.gpus_per_node or None,
            "cpus-per-task": self.cpus_per_task,
            "mem": f"{self.mem_gb}G",
            "time": self.time,
            "partition": self.partition,
            "account": self.account,
            "qos": self.qos,
            # %x: job name, %j: job id; append, so a requeued job continues the same log
            "output": f"{job.paths_root}/slurm/%x-%j.out",
            "open-mode": "append",
        }
        lines = [f"#SBATCH --{k}={v}" for k, v in opts.items() if v is not None]
        if self.requeue:
            signal = f"{self.signal_name}@{self.signal_seconds}"
            lines += ["#SBATCH --requeue", f"#SBATCH --signal={signal}"]
        return lines + [f"#SBATCH {x}" for x in self.sbatch_extra]

    def srun(self) -> list[str]:
        cmd = ["srun", "--kill-on-bad-exit=1"]
        if self.container_image:  # pyxis/enroot, where the site has it
            cmd.append(f"--container-image={self.container_image}")
            if self.container_mounts:
                cmd.append(f"--container-mounts={','.join(self.container_mounts)}")
        return cmd

    def render(self, job: Job) -> str:
        # The run name holds the job id, known only when the job runs: expanded by bash.
        expand = "run_name=${RUN_NAME}"
        args = [
            f'"{a}"' if a == expand else shlex.quote(a)
            for a in self.train_args(job, run_name="${RUN_NAME}")
        ]
        exports = [f"export {k}={shlex.quote(str(v))}" for k, v in self.env.items()]
        body = [
            "#!/bin/bash",
            "# Rendered by ldm-submit; resubmit with: sbatch <this file>",
            *self.directives(job),
            "set -euo pipefail",
            *self.setup,
            *exports,
            "# One run folder and MLflow run per job, kept across requeues (same SLURM_JOB_ID).",
            f'RUN_NAME="{job.run_name}-${{SLURM_JOB_ID}}"',
            'echo "job ${SLURM_JOB_ID} start ${SLURM_RESTART_COUNT:-0} on $(hostname): '
            'run ${RUN_NAME}"',
            " \\\n  ".join([*map(shlex.quote, [*self.srun(), self.train_command]), *args]),
        ]
        return "\n".join(body) + "\n"

    def submit(self, job: Job, path: Path) -> str:
        # SLURM opens --output before the script runs: its folder must exist already.
        (Path(job.paths_root) / "slurm").mkdir(parents=True, exist_ok=True)
        out = subprocess.run(
            ["sbatch", "--parsable", str(path)], capture_output=True, text=True, check=False
        )
        if out.returncode != 0:
            raise SubmitError(f"sbatch {path} failed: {out.stderr.strip()}")
        return out.stdout.strip().split(";")[0]
