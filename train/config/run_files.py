"""Names of the files a run keeps in its folder; light (no torch), for the early config checks."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

RUN_ID_FILE = "mlflow_run_id"  # the MLflow run this folder logs to
HPC_PATTERN = re.compile(r"hpc_ckpt_(\d+)\.ckpt$")  # preemption checkpoints (Lightning's name)


def hpc_checkpoints(run_dir: Path) -> list[Path]:
    return [p for p in Path(run_dir).glob("hpc_ckpt_*.ckpt") if HPC_PATTERN.search(p.name)]


def checkpoint_dir(cfg: Any) -> Path | None:
    """Where `callbacks.checkpoint` (a ModelCheckpoint) writes; None without one."""
    node = (cfg.get("callbacks") or {}).get("checkpoint")
    return Path(node.dirpath) if node is not None and node.get("dirpath") else None


def check_fresh_start(run_dir: Path, ckpt_dir: Path | None, ckpt_path: str | None) -> str | None:
    """Why starting from scratch in `run_dir` would replace an earlier run's checkpoints, or
    None where it would not."""
    found = sorted(Path(ckpt_dir).glob("*.ckpt")) if ckpt_dir is not None else []
    found += hpc_checkpoints(run_dir)
    if ckpt_path is None and found:
        return (
            f"{run_dir} already holds checkpoints ({found[-1].name}, ...). Resume that run with "
            "ckpt_path=last, or start a new one with run_name=<new name>"
        )
    return None


def save_hydra_files(cfg: Any) -> None:
    """What Hydra's `output_subdir` would write (config, hydra and overrides yaml in
    `<run dir>/.hydra/`), but only once the checks have passed, and by the launching process
    alone (not by ranks that torchrun, srun or Lightning's launcher start)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    if not HydraConfig.initialized():  # run() called from Python, not through ldm-train
        return
    from train.util import launched_rank

    if launched_rank() > 0 or int(os.environ.get("LOCAL_RANK") or 0) > 0:
        return  # LOCAL_RANK: a rank Lightning's launcher started
    hydra_cfg = HydraConfig.get()
    folder = Path(hydra_cfg.runtime.output_dir) / ".hydra"
    folder.mkdir(parents=True, exist_ok=True)
    # The nodes themselves, never resolved: `key=${oc.env:TOKEN}` overrides stay references.
    files = {"config.yaml": cfg, "hydra.yaml": OmegaConf.create({"hydra": hydra_cfg}),
             "overrides.yaml": hydra_cfg.overrides.task}  # fmt: skip
    for name, content in files.items():
        tmp = folder / f".{name}.tmp-{os.getpid()}"
        OmegaConf.save(content, tmp)
        os.replace(tmp, folder / name)
