"""Write image-text shards in the layout img2dataset produces, so the demo set and real web data
go through the same loader: ``KEY.jpg``, ``KEY.txt``, ``KEY.json`` with 9-digit keys."""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from data.shapes import ShapeSpec, heldout_specs, render, train_specs

T = TypeVar("T")
SHARD_PREFIX = "shapes-"
MANIFEST = "manifest.json"
HELDOUT = "heldout.json"
KEY_SHARD_STRIDE = 10_000  # img2dataset: key = shard id followed by the index inside the shard
JPEG_QUALITY = 95


def sample_key(shard_index: int, index: int) -> str:
    """img2dataset-style 9-digit key."""
    return f"{shard_index * KEY_SHARD_STRIDE + index:09d}"


def write_shards(samples: Iterable[dict[str, Any]], pattern: str, maxcount: int) -> list[str]:
    """Write samples (``__key__`` plus str/bytes members) with ``wds.ShardWriter``.

    ``pattern`` is a %-pattern such as ``"dir/shapes-%06d.tar"``. Returns the files written.
    """
    written: list[str] = []
    # mtime fixed so the same samples give byte-identical tars.
    with wds.ShardWriter(
        pattern, maxcount=maxcount, verbose=0, encoder=False, mtime=0.0, post=written.append
    ) as sink:
        for sample in samples:
            sink.write(
                {k: v.encode("utf-8") if isinstance(v, str) else v for k, v in sample.items()}
                | {"__key__": sample["__key__"]}
            )
    return written


def jpeg_bytes(image: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    buf = io.BytesIO()
    # 4:4:4 chroma: with the default 4:2:0 a 32 px triangle's colour bleeds enough to look round.
    image.save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def balanced(specs: Sequence[T], n: int, rng: np.random.Generator) -> Iterator[T]:
    """``n`` specs in whole shuffled passes, so every combination is equally frequent. Lazy: each
    pass's permutation is drawn from ``rng`` when the pass starts, between the renders."""
    order: list[T] = []
    for _ in range(n):
        if not order:
            order = [specs[j] for j in rng.permutation(len(specs))]
        yield order.pop()


def write_set_files(out: Path, heldout: list[str], manifest: dict[str, Any]) -> None:
    """A demo set's ``heldout.json`` and, last, its ``manifest.json``: its presence is what
    marks the directory complete."""
    (out / HELDOUT).write_text(json.dumps(heldout, indent=1) + "\n")
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def _demo_samples(
    specs: list[ShapeSpec], num_samples: int, samples_per_shard: int, size: int, seed: int
) -> Iterator[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    for i, spec in enumerate(balanced(specs, num_samples, rng)):
        image = render(spec, size, rng)
        meta = {
            "caption": spec.caption,
            "width": size,
            "height": size,
            "colour": spec.colour,
            "shape": spec.shape,
            "position": spec.position,
            "background": spec.background,
        }
        yield {
            "__key__": sample_key(i // samples_per_shard, i % samples_per_shard),
            "jpg": jpeg_bytes(image),
            "txt": spec.caption,
            "json": json.dumps(meta, sort_keys=True),
        }


def shard_pattern(out_dir: str | Path, num_shards: int, prefix: str = SHARD_PREFIX) -> str:
    """The brace pattern that names every demo shard in ``out_dir``."""
    last = max(num_shards - 1, 0)
    return str(Path(out_dir) / f"{prefix}{{000000..{last:06d}}}.tar")


def write_demo_shards(
    out_dir: str | Path,
    num_samples: int = 4000,
    samples_per_shard: int = 500,
    size: int = 64,
    seed: int = 0,
    heldout_seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Render the shapes demo set (training combinations only) into ``out_dir``.

    Writes ``shapes-000000.tar ...``, ``heldout.json`` (held-out captions) and, last, the
    ``manifest.json`` it returns. The same arguments give the same bytes.
    """
    if not 0 < samples_per_shard <= KEY_SHARD_STRIDE:
        raise ValueError(f"samples_per_shard must be in 1..{KEY_SHARD_STRIDE}")
    if num_samples <= 0:
        raise ValueError("num_samples must be positive")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specs = train_specs(seed=heldout_seed)
    samples = _demo_samples(specs, num_samples, samples_per_shard, size, seed)
    if progress:
        samples = tqdm(samples, total=num_samples, desc="rendering", unit="img")
    files = write_shards(samples, str(out / f"{SHARD_PREFIX}%06d.tar"), samples_per_shard)
    held = [s.caption for s in heldout_specs(seed=heldout_seed)]
    manifest = {
        "num_samples": num_samples,
        "samples_per_shard": samples_per_shard,
        "num_shards": len(files),
        "size": size,
        "seed": seed,
        "heldout_seed": heldout_seed,
        "num_train_specs": len(specs),
        "num_heldout_specs": len(held),
        "shards": [Path(f).name for f in files],
        "pattern": Path(shard_pattern(out, len(files))).name,
    }
    write_set_files(out, held, manifest)
    return manifest


def ensure_demo_shards(
    out_dir: str | Path, writer: Callable[..., dict[str, Any]] | None = None, **kwargs: Any
) -> Path:
    """Write the demo set unless ``out_dir/manifest.json`` already exists; returns ``out_dir``.
    ``writer``: the set's writer, ``write_demo_shards`` (the image set) by default.

    Writes into a sibling temp directory and renames it into place, so an interrupted run never
    leaves a partial directory that looks complete.
    """
    out = Path(out_dir)
    if (out / MANIFEST).exists():
        return out
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(
            f"{out} exists, is not empty and has no {MANIFEST}: not a finished demo set; "
            "remove it or pick another directory"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (writer or write_demo_shards)(tmp, **kwargs)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        # Another process (say, another rank) finished the same set first: use theirs.
        if (out / MANIFEST).exists():
            return out
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
