"""SLURM: an sbatch script with one task per GPU, `srun ldm-train`, requeue on preemption."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

from jobs.evaluation import EVAL_COMMAND, TRAIN_JOB_ENV, eval_name
from jobs.launcher import Job, Launcher, SubmitError, local_command

TIME = re.compile(r"^(\d+-)?\d+(:\d{2}){0,2}$|^\d+-\d+$")


def option_lines(words: list[str]) -> list[str]:
    """A command as lines that each start with an option (`--flag value` kept together)."""
    lines: list[str] = []
    for word in words:
        if word.startswith("-") or not lines:
            lines.append(word)
        else:
            lines[-1] += f" {word}"
    return lines


class SlurmLauncher(Launcher):
    """`sbatch` job: `--ntasks-per-node` = GPUs per node (or `procs_per_node` on CPU nodes);
    Lightning's SLURM environment turns the srun tasks into ranks.

    With `requeue`, SLURM sends `signal_name` `signal_seconds` before the time limit (or when a
    preemption is announced); the training run then checkpoints and requeues itself
    (train/callbacks/preemption.py), and the requeued job (same SLURM_JOB_ID) resumes into the same
    run
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
        # By name, from PATH: the image's inside a container; outside, the first on the PATH
        # that the setup lines leave (this environment's unless they activate another).
        self.train_command = train_command or "ldm-train"

    def names(self, run_name: str, stamp: str) -> tuple[str, str]:
        # The job id makes each submission's run name unique; a requeue keeps it.
        return self.job_name or run_name, run_name

    def filename(self, job: Job) -> str:
        return f"{job.name}.sbatch"

    def directives(self, job: Job, tasks: int | None = None, gpus: int | None = None,
                   signal: bool = True) -> list[str]:  # fmt: skip
        """The #SBATCH lines; `tasks`/`gpus` per node (default: the training job's)."""
        opts = {
            "job-name": job.name,
            "nodes": self.nodes if tasks is None else 1,
            "ntasks-per-node": tasks or self.procs,
            "gpus-per-node": (self.gpus_per_node if gpus is None else gpus) or None,
            "cpus-per-task": self.cpus_per_task,
            "mem": f"{self.mem_gb}G",
            "time": self.time,
            "partition": self.partition,
            "account": self.account,
            "qos": self.qos,
            # The job log is the script's own (log_lines); this file gets only what SLURM
            # writes itself (time limit, cancellation): in the folder sbatch ran in, which
            # exists. Appended, so a requeued job continues it.
            "open-mode": "append",
        }
        lines = [f"#SBATCH --{k}={v}" for k, v in opts.items() if v is not None]
        if self.requeue:
            lines.append("#SBATCH --requeue")
        if self.requeue and signal:
            lines.append(f"#SBATCH --signal={self.signal_name}@{self.signal_seconds}")
        return lines + [f"#SBATCH {x}" for x in self.sbatch_extra]

    def srun(self) -> list[str]:
        cmd = ["srun", "--kill-on-bad-exit=1"]
        if self.container_image:  # pyxis/enroot, where the site has it
            cmd.append(f"--container-image={self.container_image}")
            if self.container_mounts:
                cmd.append(f"--container-mounts={','.join(self.container_mounts)}")
        return cmd

    def log_lines(self, job: Job) -> list[str]:
        """The script writes its log itself, into a folder it makes: sbatch opens an --output
        file before the script runs and fails the job when the folder is missing, as it is for
        a script saved from --dry-run on a fresh paths.root."""
        folder = shlex.quote(f"{job.paths_root}/slurm")
        return [
            "# The job log, made here: sbatch fails a job whose --output folder is missing.",
            "# SLURM's own messages (time limit, cancel) go to slurm-<id>.out where sbatch ran.",
            f"mkdir -p {folder}",
            f'exec >>{folder}/"${{SLURM_JOB_NAME}}-${{SLURM_JOB_ID}}.out" 2>&1',
        ]

    def path_lines(self) -> list[str]:
        """This environment's bin first on PATH, before the setup lines: its `ldm-train` runs
        even where sbatch does not pass the environment on, and a setup line that activates
        another environment puts that one's first instead. A container has its own PATH."""
        found = Path(local_command("ldm-train"))
        if self.container_image or not found.is_absolute():
            return []
        return [
            "# ldm-train of the submitting environment, unless a setup line activates another.",
            f'export PATH={shlex.quote(str(found.parent))}:"$PATH"',
        ]

    def render(self, job: Job) -> str:
        # The run name holds the job id, known only when the job runs: expanded by bash.
        expand = "run_name=${RUN_NAME}"
        args = [
            f'"{a}"' if a == expand else shlex.quote(a)
            for a in self.train_args(job, run_name="${RUN_NAME}")
        ]
        body = [
            "#!/bin/bash",
            "# Rendered by ldm-submit; resubmit with: sbatch <this file>",
            *self.directives(job),
            "set -euo pipefail",
            *self.log_lines(job),
            *self.path_lines(),
            *self.setup,
            *self.export_lines(),
            "# One run folder and MLflow run per job, kept across requeues (same SLURM_JOB_ID).",
            f'RUN_NAME="{job.run_name}-${{SLURM_JOB_ID}}"',
            'echo "job ${SLURM_JOB_ID} start ${SLURM_RESTART_COUNT:-0} on $(hostname): '
            'run ${RUN_NAME}"',
            " \\\n  ".join([*map(shlex.quote, [*self.srun(), self.train_command]), *args]),
        ]
        return "\n".join(body) + "\n"

    def render_eval(self, job: Job, eval_args: list[str]) -> str:
        """One task (one GPU on GPU nodes) running `ldm-eval --watch` on the training job's run
        folder, named by the training job's id in LDM_TRAIN_JOB_ID (`submit_eval` passes it).
        Requeued, it resumes: the watcher skips what it has scored."""
        evaluator = Job(eval_name(job.name), job.run_name, [], job.paths_root)
        run_dir = f"{job.paths_root}/runs/{job.run_name}-${{{TRAIN_JOB_ENV}}}"
        # srun ... ldm-eval "${RUN_DIR}" --watch on one line, then one line per option.
        srun = " ".join(map(shlex.quote, [*self.srun(), EVAL_COMMAND]))
        cmd_lines = [f'{srun} "${{RUN_DIR}}" --watch',
                     *option_lines([shlex.quote(a) for a in eval_args])]  # fmt: skip
        body = [
            "#!/bin/bash",
            f"# Rendered by ldm-submit; resubmit with: sbatch --export=ALL,{TRAIN_JOB_ENV}=<id> "
            "<this file>",
            *self.directives(evaluator, tasks=1, gpus=min(self.gpus_per_node, 1), signal=False),
            "set -euo pipefail",
            *self.log_lines(evaluator),
            *self.path_lines(),
            *self.setup,
            *self.export_lines(),
            "# The training job's run folder: its run name carries that job's id.",
            f': "${{{TRAIN_JOB_ENV}:?the id of the training job to evaluate}}"',
            f'RUN_DIR="{run_dir}"',
            " \\\n  ".join(cmd_lines),
        ]
        return "\n".join(body) + "\n"

    def submit_eval(self, job: Job, path: Path, submitted: str) -> str:
        """After the training job `submitted` has started; cancelled if it never can."""
        out = subprocess.run(
            ["sbatch", "--parsable", f"--dependency=after:{submitted}", "--kill-on-invalid-dep=yes",
             f"--export=ALL,{TRAIN_JOB_ENV}={submitted}", str(path)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if out.returncode != 0:
            raise SubmitError(f"sbatch {path} failed: {out.stderr.strip()}")
        return out.stdout.strip().split(";")[0]

    def submit(self, job: Job, path: Path) -> str:
        out = subprocess.run(
            ["sbatch", "--parsable", str(path)], capture_output=True, text=True, check=False
        )
        if out.returncode != 0:
            raise SubmitError(f"sbatch {path} failed: {out.stderr.strip()}")
        return out.stdout.strip().split(";")[0]
