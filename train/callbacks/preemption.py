"""Preemption: checkpoint at a step boundary on SLURM's warning signal (then requeue) or on
SIGTERM (then exit 143), and resume from it.

`sbatch --requeue --signal=USR1@<seconds>` warns the job's steps before the time limit or a
preemption. Lightning's own SLURM handler saves its checkpoint *inside* the signal handler, i.e.
wherever each rank happens to be (one rank mid-backward in a gradient all-reduce, another in the
data loader), and the save's collectives can then interleave with the step's. Here the handler
only sets a flag; every rank checks it after a whole optimizer step (one tiny all-reduce), so all
ranks save the same step together. The requeued job (same SLURM_JOB_ID, SLURM_RESTART_COUNT+1)
runs the same command with `ckpt_path=last`, which `checkpoint_io.resolve_checkpoint` maps to the
newest whole one of these `hpc_ckpt_<n>.ckpt` (Lightning's name, so `ckpt_path=hpc` works too) and
the periodic checkpoints.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Checkpoint

from train.config.run_files import HPC_PATTERN, hpc_checkpoints

log = logging.getLogger(__name__)


class RequeueOnSignal(Checkpoint):
    """Active only inside a SLURM job; elsewhere it does nothing.

    A `Checkpoint` so that Lightning runs it after the other callbacks' batch-end hooks (EMA,
    data health), as it does for `ModelCheckpoint`: the saved state is the whole step's.
    """

    def __init__(self, signal_name: str = "SIGUSR1") -> None:
        self.signum = signal.Signals[signal_name]
        self.received = False
        self.requeued = False
        self._previous = None
        self._active = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Registered before Lightning's signal connector runs, which then leaves this signal to
        # us (it only installs its handler where none is set).
        self._active = stage == "fit" and SLURMEnvironment.detect()
        if self._active:
            self._previous = signal.signal(self.signum, self._on_signal)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._active:
            signal.signal(self.signum, self._previous or signal.SIG_DFL)
            self._active = False

    def _on_signal(self, signum: int, frame: object) -> None:
        self.received = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._active or self.requeued:
            return
        if not trainer.strategy.reduce_boolean_decision(self.received, all=False):
            return
        path = save_hpc_checkpoint(trainer)
        requeued = trainer.strategy.broadcast(requeue_job() if trainer.is_global_zero else False)
        if requeued:
            self.requeued = True
            trainer.should_stop = True  # SLURM will also stop us; end cleanly first
            if trainer.is_global_zero:
                print(f"Preempted at step {trainer.global_step}: saved {path}; job requeued",
                      flush=True)  # fmt: skip
        else:
            self.received = False  # not requeueable: keep training, the checkpoint stays


class CheckpointOnTerminate(Checkpoint):
    """SIGTERM, the way Kubernetes (node drain, preemption, eviction), `docker stop` and
    `scancel` stop a job, with a grace period before SIGKILL: checkpoint at the next step
    boundary, stop without exporting, and let the entry point exit with 143 (128 + SIGTERM,
    so a Job counts the pod as failed and restarts it, and `ckpt_path=last` resumes there).

    Lightning's own SIGTERM handler is replaced for the training loop: it broadcasts from inside
    the handler (wherever each rank is, between two collectives of the step) and then stops
    without saving. DataLoader workers ignore the signal (`data.loader.ignore_terminate`): the
    process group's SIGTERM reaches them too, and their death would end the run with an error.
    """

    def __init__(self, signal_name: str = "SIGTERM") -> None:
        self.signum = signal.Signals[signal_name]
        self.received = False
        self.stopped_at: int | None = None
        self.path: Path | None = None
        self._previous = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After Lightning's signal connector has installed its handler (it restores the ones
        # from before fit in its teardown). Taking SIGTERM over from Lightning (which would
        # raise SIGTERMException mid-step) has no public API: `trainer.received_sigterm` only
        # reads the connector's flag, so the flag is cleared on the connector itself.
        connector = trainer._signal_connector
        self.received = self.received or connector.received_sigterm
        connector.received_sigterm = False
        self._previous = signal.signal(self.signum, self._on_signal)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None

    def _on_signal(self, signum: int, frame: object) -> None:
        self.received = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.stopped_at is not None:
            return
        if not trainer.strategy.reduce_boolean_decision(self.received, all=False):
            return
        self.path = save_hpc_checkpoint(trainer)
        self.stopped_at = trainer.global_step
        trainer.should_stop = True
        if trainer.is_global_zero:
            print(f"{self.signum.name} received: saved {self.path} at step {self.stopped_at}; "
                  "stopping (resume with ckpt_path=last)", flush=True)  # fmt: skip


class Terminated(RuntimeError):
    """The run was stopped by a termination signal after saving a checkpoint."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum  # what a shell reports for a process the signal ended


def terminated(trainer: L.Trainer) -> CheckpointOnTerminate | None:
    stopped = [c for c in trainer.callbacks if isinstance(c, CheckpointOnTerminate)]
    return next((c for c in stopped if c.stopped_at is not None), None)


def preempted(trainer: L.Trainer) -> bool:
    """True once this run has checkpointed to stop (requeued, or terminated): the end-of-run
    exports and previews are skipped, as the resumed run writes them at its real end."""
    requeued = any(isinstance(cb, RequeueOnSignal) and cb.requeued for cb in trainer.callbacks)
    return requeued or terminated(trainer) is not None


def raise_if_terminated(trainer: L.Trainer) -> None:
    """After `fit`: a terminated run's MLflow run is KILLED (not FINISHED), and the entry point
    learns that it must exit with 128 + the signal."""
    cb = terminated(trainer)
    if cb is None:
        return
    if trainer.is_global_zero:
        from train.tracking.tags import mlflow_loggers

        for logger in mlflow_loggers(trainer):
            logger.experiment.set_terminated(logger.run_id, "KILLED")
    raise Terminated(f"stopped by {cb.signum.name} at step {cb.stopped_at}; saved {cb.path}; "
                     "resume with ckpt_path=last", int(cb.signum))  # fmt: skip


def save_hpc_checkpoint(trainer: L.Trainer) -> Path:
    """Save (collective) to a new `hpc_ckpt_<n>.ckpt` in the run folder; written under a
    temporary name first so a kill mid-write never leaves a broken newest checkpoint."""
    run_dir = Path(trainer.default_root_dir)
    numbers = [int(HPC_PATTERN.search(p.name).group(1)) for p in hpc_checkpoints(run_dir)]
    final = run_dir / f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt"
    tmp = run_dir / f".{final.name}.partial"
    trainer.save_checkpoint(tmp)
    trainer.strategy.barrier("hpc_checkpoint_saved")
    if trainer.is_global_zero:
        os.rename(tmp, final)  # file or (DeepSpeed) folder; `final` is new, so never replaced
    trainer.strategy.barrier("hpc_checkpoint_renamed")
    return final


def requeue_job() -> bool:
    """`scontrol requeue` this job (array task aware); False if SLURM refuses (no --requeue)."""
    job = os.environ["SLURM_JOB_ID"]
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    out = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if out.returncode != 0:
        log.warning("scontrol requeue %s failed: %s", job, out.stderr.strip())
    return out.returncode == 0
