"""Small helpers shared by the modules: atomic output folders and files, image grids, launcher
rank."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from PIL import Image


@contextlib.contextmanager
def atomic_dir(out_dir: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `out_dir`, on error it is removed.

    A crash mid-write therefore never leaves a half-written export where a good one was.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.parent / f".{out.name}.old"
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(out_file: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path to write; on success it replaces `out_file`, on error it is
    removed, so a failed write never leaves a half-written file where a good one was."""
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def image_grid(images: Sequence[Image.Image], cols: int | None = None) -> Image.Image:
    """Tile images (all the same size) into one grid image, row-major, through diffusers'
    `make_image_grid`; a last row that is not full is padded with white tiles."""
    from diffusers.utils import make_image_grid

    if not images:
        raise ValueError("image_grid needs at least one image")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    blank = Image.new("RGB", images[0].size, "white")
    tiles = [img.convert("RGB") for img in images] + [blank] * (rows * cols - len(images))
    return make_image_grid(tiles, rows=rows, cols=cols)


def launched_rank() -> int:
    """Global rank given by an external launcher (torchrun / TorchElastic, SLURM's srun); 0
    where there is none (a single process, or Lightning's launcher before it starts ranks)."""
    return int(os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or 0)
