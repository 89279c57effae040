"""Reference features of a set's real images: computed once (`ldm-data stats`), stored with the
set's fingerprint and the extractor's description, refused for another set or extractor."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from data.evalset import iter_eval_samples, set_fingerprint
from train.errors import ConfigError
from train.evaluation.features import describe
from train.evaluation.options import REFERENCE_FORMAT, check_same_set, reference_metadata
from train.util import atomic_file


def images_to_uint8(images: list) -> torch.Tensor:
    """PIL RGB images (one size) as uint8 [N, 3, H, W]."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def compute_reference(
    urls: str | list[str],
    feature: nn.Module,
    out_path: str | Path,
    resolution: int,
    max_samples: int | None = None,
    batch_size: int = 32,
) -> dict[str, str]:
    """Features [N, D] of the set's images (resized and centre-cropped to ``resolution``),
    written to ``out_path`` (safetensors) with the set's fingerprint; returns the metadata."""
    sha, shards, total = set_fingerprint(urls)
    feats, batch = [], []
    for sample in iter_eval_samples(shards, resolution, max_samples):
        batch.append(sample.image)
        if len(batch) == batch_size:
            feats.append(feature(images_to_uint8(batch)).double().cpu())
            batch = []
    if batch:
        feats.append(feature(images_to_uint8(batch)).double().cpu())
    if sum(len(f) for f in feats) < 2:
        raise ConfigError(f"{urls}: fewer than 2 images; reference statistics need a real set")
    features = torch.cat(feats)
    meta = {"format": REFERENCE_FORMAT, "set_sha256": sha, "set_num_samples": str(total),
            "num_samples": str(len(features)), "feature": describe(feature),
            "resolution": str(resolution), "shards": json.dumps(shards[:20])}  # fmt: skip
    with atomic_file(out_path) as tmp:  # never a half-written reference under the final name
        save_file({"features": features.contiguous()}, str(tmp), metadata=meta)
    return meta


def reference_resolution(path: str | Path) -> int:
    """The side the reference images were resized to (`ldm-data stats --resolution`)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return int((f.metadata() or {}).get("resolution", 0))


def check_resolution(path: str | Path, generated: int, setting: str) -> None:
    """Generated images must be compared with references made at their size."""
    made = reference_resolution(path)
    if made and made != generated:
        raise ConfigError(
            f"{setting}={path} was made at {made} px, the images here are {generated} px: "
            f"recompute it with `ldm-data stats ... --resolution {generated}`"
        )


def load_reference(
    path: str | Path, urls: str | list[str] | None, feature: nn.Module
) -> torch.Tensor:
    """The reference features in ``path``, after checking they were computed for the set at
    ``urls`` (unless None) with this extractor. Raises ConfigError naming what differs."""
    path = Path(path)
    meta = reference_metadata(path)
    mine = describe(feature)
    if meta["feature"] != mine:
        raise ConfigError(
            f"reference statistics {path} were computed with feature extractor "
            f"{meta['feature']!r}, this evaluation uses {mine!r}; recompute them with this one"
        )
    if urls is not None:
        check_same_set(meta, path, urls)
    return load_file(str(path))["features"]
