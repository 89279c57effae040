"""What every launcher shares: resources, the `ldm-train` arguments a job runs, the job's name."""

from __future__ import annotations

import re
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from train.tracking.secrets import is_secret_name, literal_secret

# Keys a launcher sets from its own resources; the same keys given as overrides would disagree.
LAUNCHER_OWNED = ("trainer.num_nodes", "trainer.devices", "trainer.accelerator", "ckpt_path")
# Keys whose composed values the launcher passes on itself (run_name gets the job's suffix).
PASSED_BY_LAUNCHER = ("paths.root", "run_name")


class SubmitError(ValueError):
    """A launcher setting or override that cannot work; the message names it and what to do."""


@dataclass
class Job:
    """A job to render: its name, run name and the `ldm-train` overrides it runs with."""

    name: str  # scheduler-side name (SLURM job name, Kubernetes object name)
    run_name: str  # `run_name=` of the training run: one run folder and MLflow run per job
    overrides: list[str] = field(default_factory=list)  # the user's, launcher keys removed
    paths_root: str = "outputs"  # where the job's processes write (a shared filesystem)


class Launcher:
    """Resources of one job. GPUs: one process per GPU; CPU nodes: `procs_per_node` processes."""

    def __init__(
        self,
        nodes: int = 1,
        gpus_per_node: int = 0,
        procs_per_node: int = 1,
        cpus_per_task: int = 4,
        mem_gb: int = 16,
        job_name: str | None = None,
        env: dict[str, str] | None = None,
        check_paths: bool = True,
    ) -> None:
        if nodes < 1 or gpus_per_node < 0 or procs_per_node < 1:
            raise SubmitError(
                f"launcher.nodes={nodes}, launcher.gpus_per_node={gpus_per_node}, "
                f"launcher.procs_per_node={procs_per_node}: need nodes >= 1, gpus_per_node >= 0 "
                "and procs_per_node >= 1"
            )
        self.nodes, self.gpus_per_node = nodes, gpus_per_node
        self.procs = gpus_per_node or procs_per_node
        self.cpus_per_task, self.mem_gb = cpus_per_task, mem_gb
        self.job_name = job_name
        self.check_paths = check_paths  # whether ldm-submit checks data/model paths here
        self.env = dict(env or {})
        for name in self.env:
            if is_secret_name(name):
                raise SubmitError(
                    f"launcher.env.{name} looks like a secret and would be written into the job "
                    "file. On SLURM export it before ldm-submit (sbatch passes your environment); "
                    f"on Kubernetes use launcher.secret_env.{name}=<secret name>"
                )

    def export_lines(self) -> list[str]:
        """`launcher.env` as shell exports, for the launchers that render scripts."""
        return [f"export {k}={shlex.quote(str(v))}" for k, v in self.env.items()]

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs

    def trainer_overrides(self) -> list[str]:
        """The Trainer's layout from these resources (Lightning checks it against the launcher's
        environment: SLURM tasks per node, torchrun processes per node)."""
        return [
            f"trainer.num_nodes={self.nodes}",
            f"trainer.devices={self.procs}",
            f"trainer.accelerator={'gpu' if self.gpus_per_node else 'cpu'}",
        ]

    def train_args(self, job: Job, run_name: str | None = None) -> list[str]:
        """`ldm-train` overrides of the job's processes. `ckpt_path=last`: a restarted or requeued
        job resumes from its newest checkpoint; the first start finds none and starts fresh."""
        return [
            *job.overrides,
            *self.trainer_overrides(),
            f"paths.root={job.paths_root}",
            f"run_name={run_name or job.run_name}",
            "ckpt_path=last",
        ]

    def names(self, run_name: str, stamp: str) -> tuple[str, str]:
        """(job name, run name): every submission is a new run (`launcher.job_name` or the
        run name with a time stamp); restarts of the same job resume it."""
        name = self.job_name or f"{run_name}-{stamp}"
        return name, name

    def render(self, job: Job) -> str:
        raise NotImplementedError

    def filename(self, job: Job) -> str:
        raise NotImplementedError

    def submit(self, job: Job, path: Path) -> str:
        """Submit the rendered job written at `path`; returns what identifies it."""
        raise NotImplementedError

    def render_eval(self, job: Job, eval_args: list[str]) -> str:
        """The evaluation job beside `job` (jobs/evaluation.py): `ldm-eval --watch` on its run."""
        raise SubmitError(
            f"--eval: {type(self).__name__} renders no evaluation job; use launcher=slurm or a "
            "Kubernetes launcher, or run `ldm-eval RUN_DIR --watch ...` beside the training"
        )

    def submit_eval(self, job: Job, path: Path, submitted: str) -> str:
        """Submit the evaluation job at `path`, for the training job `submit` returned."""
        raise NotImplementedError


def user_overrides(overrides: list[str]) -> list[str]:
    """The overrides a job passes on to `ldm-train`: all but the launcher's own, refusing those
    that set what the launcher derives from its resources."""
    kept = []
    for o in overrides:
        key = o.lstrip("+~").split("=", 1)[0]
        if key == "launcher" or key.startswith("launcher.") or key in PASSED_BY_LAUNCHER:
            continue
        if literal_secret(o):
            raise SubmitError(
                f"{key}=... would write a secret into the job file; pass {key}='${{oc.env:NAME}}' "
                "and provide NAME in the job's environment"
            )
        if key in LAUNCHER_OWNED:
            raise SubmitError(
                f"{o!r}: the launcher sets {key} from its resources (launcher.nodes, "
                "launcher.gpus_per_node, launcher.procs_per_node) and always resumes "
                "(ckpt_path=last); remove it"
            )
        kept.append(o)
    return kept


DNS_LIMIT = 40  # of the 63 a DNS-1123 label may have: room for the controllers' suffixes


def dns_name(text: str, limit: int = DNS_LIMIT) -> str:
    """A DNS-1123 label (lowercase alphanumerics and '-') for Kubernetes object names; short,
    because controllers append suffixes (JobSet: -<job>-<index>-<pod>) within 63 characters."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:limit].rstrip("-")
    if not name or not name[0].isalpha():
        name = f"ldm-{name}".rstrip("-")[:limit]
    return name


def local_command(name: str) -> str:
    """`name` beside this interpreter (the venv's console script) where it exists; sbatch and
    torchrun then need no activated environment."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else (shutil.which(name) or name)
