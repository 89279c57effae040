"""Checkpoint files that are whole or absent: written aside, flushed, renamed into place.

Lightning's `TorchCheckpointIO` buffers the whole checkpoint in memory and writes it through an
fsspec transaction whose temporary file lives in the system temp folder, so for a checkpoint
folder on another filesystem the final move is a copy: a kill or a full disk during that copy
leaves a truncated `last.ckpt` where a good one was. Here the temporary file sits beside the
target (same filesystem), is fsynced, and `os.replace` swaps it in atomically.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from data.sources import is_remote
from train.config.run_files import hpc_checkpoints
from train.errors import ConfigError

log = logging.getLogger(__name__)
TMP_MARK = ".tmp-"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; the message says why and what was kept."""


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        if storage_options is not None or is_remote(str(path)):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as e:
            # torch.save reports a full disk as a RuntimeError ("unexpected pos"), not ENOSPC:
            # look at the disk itself, before the partial file gives its space back.
            full = (isinstance(e, OSError) and e.errno in DISK_FULL) or disk_full(path.parent)
            tmp.unlink(missing_ok=True)
            if full:
                raise CheckpointWriteError(disk_full_message(path)) from e
            raise

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: Any = None):
        """Resume reads tensors and plain containers only (`weights_only=True`): a checkpoint
        file that smuggles other objects is refused instead of running their code."""
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)


def disk_full(folder: Path, margin: int = 2**20) -> bool:
    return shutil.disk_usage(folder).free < margin


def disk_full_message(path: Path) -> str:
    free = shutil.disk_usage(path.parent).free / 2**20
    kept = "; ".join(p.name for p in sorted(path.parent.glob("*.ckpt"))) or "none"
    return (
        f"could not write checkpoint {path}: No space left on device ({free:.0f} MiB free in "
        f"{path.parent}). Checkpoints already there are intact ({kept}). Free space, or "
        "point callbacks.checkpoint.dirpath at a larger filesystem, then resume with "
        "ckpt_path=last"
    )


def resolve_checkpoint(ckpt_path: str | None, run_dir: Path, last_dir: Path | None) -> str | None:
    """`ckpt_path=last`: the newest checkpoint of this run that is whole: preemption checkpoints
    (`hpc_ckpt_<n>.ckpt`), `last.ckpt` and the periodic `step_*.ckpt`, newest first, skipping
    (with a warning) any that a kill or a full disk left broken; None (a fresh start) where
    there is none. Any other value is returned as is, and must be readable."""
    if ckpt_path != "last":
        if ckpt_path is not None and Path(ckpt_path).exists():
            reason = unreadable(Path(ckpt_path))
            if reason:
                raise ConfigError(f"ckpt_path={ckpt_path}: {reason}; pick another checkpoint")
        return ckpt_path
    remove_partials(run_dir)
    candidates = hpc_checkpoints(run_dir)
    if last_dir is not None:
        remove_partials(Path(last_dir))
        candidates += [p for p in Path(last_dir).glob("*.ckpt") if not p.name.startswith(".")]
    for path in sorted(candidates, key=lambda p: p.stat().st_mtime, reverse=True):
        reason = unreadable(path)
        if reason is None:
            return str(path)
        log.warning("skipping checkpoint %s: %s", path, reason)
        print(f"Skipping broken checkpoint {path}: {reason}", flush=True)
    return None


def remove_partials(folder: Path) -> None:
    """Temporary files of checkpoint writes that were killed. Called before training starts,
    when no process of this run can still be writing them."""
    if not Path(folder).is_dir():
        return
    for tmp in [*Path(folder).glob(f".*{TMP_MARK}*"), *Path(folder).glob(".*.partial")]:
        log.warning("removing %s, left by a checkpoint write that was interrupted", tmp)
        # Every rank runs this at start: another may have removed it already.
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)


def unreadable(path: Path) -> str | None:
    """Why `path` cannot be resumed from, or None if it looks whole. Files are opened
    memory-mapped (no tensor data read); sharded folders are checked for their index files."""
    if path.is_dir():
        if (path / "latest").is_file() or (path / ".metadata").is_file():
            return None  # DeepSpeed tag pointer / torch.distributed.checkpoint metadata
        return "a checkpoint folder without DeepSpeed's `latest` or a `.metadata` index"
    if not zipfile.is_zipfile(path):
        return "not a complete torch checkpoint (truncated or corrupt zip archive)"
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to load means: do not resume from it
        return f"cannot be loaded: {type(e).__name__}: {e}"
    if not isinstance(state, dict) or "global_step" not in state:
        return "not a Lightning checkpoint (no global_step)"
    return None
