"""What a run records to be reproducible: package versions, the dataset it read, where it ran.

Tags rather than params: MLflow params are immutable, and a resumed or requeued run may run on
other hosts with other job ids; tags keep the latest values and params keep the first config.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

# The libraries whose versions change what a run computes.
PACKAGES = (
    "ldm-pipeline", "torch", "lightning", "diffusers", "transformers", "mlflow", "deepspeed",
    "webdataset", "hydra-core", "omegaconf", "safetensors", "numpy", "pillow",
)  # fmt: skip
# Scheduler and cluster identities, when set: SLURM, torchrun, and the Kubernetes pod (ldm-submit
# passes POD_NAME/POD_NAMESPACE through the downward API and LDM_JOB_NAME).
ENV_IDS = {
    "SLURM_JOB_ID": "slurm_job_id",
    "SLURM_ARRAY_JOB_ID": "slurm_array_job_id",
    "SLURM_ARRAY_TASK_ID": "slurm_array_task_id",
    "SLURM_RESTART_COUNT": "slurm_restart_count",
    "SLURM_JOB_NODELIST": "slurm_nodelist",
    "TORCHELASTIC_RUN_ID": "torchelastic_run_id",
    "POD_NAME": "k8s.pod",
    "POD_NAMESPACE": "k8s.namespace",
    "LDM_JOB_NAME": "k8s.job",
}


def package_versions() -> dict[str, str]:
    """`version.<package>` tags for the installed packages of PACKAGES, and Python's."""
    tags = {"version.python": platform.python_version()}
    for name in PACKAGES:
        try:
            tags[f"version.{name}"] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return tags


def environment_ids() -> dict[str, str]:
    return {tag: os.environ[var] for var, tag in ENV_IDS.items() if os.environ.get(var)}


def requirements() -> str:
    """`name==version` of every installed distribution (the whole environment), sorted."""
    seen = {(d.metadata["Name"] or "?").lower(): d.version for d in metadata.distributions()}
    return "".join(f"{name}=={version}\n" for name, version in sorted(seen.items()))


def dataset_manifest(datamodule: Any, patterns: Any) -> tuple[dict[str, str], str]:
    """Tags describing the training (and validation) shards, and the manifest they hash.

    The manifest lists each shard with its sample count (and mixture weight); its SHA-256 tells
    whether two runs read the same data without comparing shard lists by eye.
    """
    lines = ["split\tshard\tsamples\tweight"]
    weights = getattr(datamodule, "weights", None) or [None] * len(datamodule.shards)
    for shard, size, weight in zip(datamodule.shards, datamodule.sizes, weights, strict=False):
        lines.append(f"train\t{shard}\t{size}\t{'' if weight is None else weight}")
    for shard, size in zip(datamodule.val_shards or [], datamodule.val_sizes or [], strict=False):
        lines.append(f"val\t{shard}\t{size}\t")
    manifest = "\n".join(lines) + "\n"
    tags = {
        "dataset.patterns": str(patterns)[:5000],  # MLflow caps tag values
        "dataset.num_shards": str(len(datamodule.shards)),
        "dataset.num_samples": str(sum(datamodule.sizes)),
        "dataset.manifest_sha256": hashlib.sha256(manifest.encode()).hexdigest(),
    }
    if datamodule.val_shards:
        tags["dataset.val_num_samples"] = str(sum(datamodule.val_sizes or []))
    return tags, manifest


def finetune_tags(module: Any) -> dict[str, str]:
    """Tags of a run that starts from a pretrained base (LoRA, ControlNet, inpainting; empty for
    others): the base model as given and that base's content hash, so that what it wrote names
    the exact weights it belongs to, plus an adapter's kind, rank, alpha and targets."""
    tags = adapter_tags(getattr(getattr(module, "backbone", None), "adapter", None))
    text = getattr(getattr(module, "trained_conditioner", None), "adapter", None)
    tags.update(adapter_tags(text, "text_encoder_adapter"))
    base = getattr(module, "base", None)
    if base:
        tags["base_model"] = str(base)
        tags["base_model.sha256"] = base_sha256(str(base))
    return tags


def adapter_tags(config: Any, prefix: str = "adapter") -> dict[str, str]:
    """A peft adapter config's kind, rank, alpha and targets as tags ({} for None)."""
    if config is None:
        return {}
    tags = {f"{prefix}.type": type(config).__name__}
    for key, tag in (("r", "rank"), ("lora_alpha", "alpha"), ("alpha", "alpha"),
                     ("use_dora", "use_dora"), ("target_modules", "target_modules")):  # fmt: skip
        value = getattr(config, key, None)
        if value is not None and f"{prefix}.{tag}" not in tags:
            value = sorted(value) if isinstance(value, set) else value
            tags[f"{prefix}.{tag}"] = str(value)[:5000]
    return tags


@functools.lru_cache(maxsize=8)
def base_sha256(base: str) -> str:
    """SHA-256 over a pretrained pipeline's files (relative paths and contents, in path order):
    a local folder, or a hub id's snapshot in the local cache; "unavailable" when neither."""
    folder = Path(base)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(base, local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached, not a repo id: nothing to hash
            return "unavailable"
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
