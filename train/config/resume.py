"""Checks that a resume can continue its checkpoint, made before the run touches anything.

Lightning restores the data position inside `fit`, after the loggers have resumed the earlier
MLflow run: a refusal there marks that finished run FAILED and replaces its tags. These checks
read the checkpoint first (memory-mapped, weights only) and refuse before anything is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from data.loader import position_mismatch
from train.errors import ConfigError

# Where Lightning's strategies keep the loops' state in a sharded checkpoint folder.
SHARDED_STATE_FILES = ("meta.pt", "checkpoint/mp_rank_00_model_states.pt")


def saved_data_position(ckpt_path: str | Path) -> dict[str, Any] | None:
    """The train loader's state stored with the fit loop, or None where the checkpoint does not
    hold one we can read without unpickling objects (it is then checked when `fit` restores it)."""
    path = Path(ckpt_path)
    if path.is_dir():
        path = next((path / f for f in SHARDED_STATE_FILES if (path / f).is_file()), path)
    if not path.is_file():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # noqa: BLE001 - any reader error: leave the check to Lightning's restore
        return None
    loaders = (ckpt.get("loops") or {}).get("fit_loop", {}).get("state_dict", {})
    states = loaders.get("combined_loader") or []
    return states[0] if states and isinstance(states[0], dict) else None


def check_resume_data(ckpt_path: str | None, datamodule: Any, world_size: int) -> None:
    """Refuse a resume whose data settings differ from the checkpoint's (exact resume)."""
    if ckpt_path is None or not hasattr(datamodule, "shards"):
        return
    saved = saved_data_position(ckpt_path)
    if saved is None:
        return
    mine = {
        # A loader without workers reads as one reader (ShardStream.configure).
        "num_workers": max(1, int(datamodule.num_workers)),
        "world_size": world_size,
        "num_shards": len(datamodule.shards),
        "seed": datamodule.seed,
        "batch_size": datamodule.batch_size,
    }
    problem = position_mismatch(saved, mine)
    if problem:
        raise ConfigError(f"ckpt_path={ckpt_path}: {problem}")
