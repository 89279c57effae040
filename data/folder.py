"""``ldm-data from-folder``: a folder of captioned images -> shards in img2dataset's layout.

Captions come from a ``NAME.txt`` beside each image or from a CSV/parquet table. Image bytes are
stored as they are, never re-encoded, so the shards hold exactly the source files.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from data.shards import write_shards
from data.sources import count_tar_samples, read_json_map
from data.video import VideoError, probe

IMAGE_SUFFIXES = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
VIDEO_SUFFIXES = {".mp4": "mp4", ".webm": "webm", ".mkv": "mkv"}  # read with +data/video=clips
MEDIA_SUFFIXES = IMAGE_SUFFIXES | VIDEO_SUFFIXES
# The member name follows the bytes, not the file name: a PNG saved as .jpg is stored as KEY.png.
FORMAT_MEMBERS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
SIZES_FILE = "sizes.json"  # the name data.sources.ShardSizes looks for beside the shards
TABLE_SUFFIXES = (".csv", ".tsv", ".parquet")

Caption = tuple[str, dict[str, Any]]  # caption and the table's extra columns


@dataclass
class FolderResult:
    """What ``folder_to_shards`` found and wrote. Paths are relative to the source folder."""

    images: int = 0
    written: int = 0
    no_caption: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    unmatched_rows: list[str] = field(default_factory=list)  # table paths with no image
    shards: dict[str, int] = field(default_factory=dict)  # shard file name -> samples


def find_images(src: Path) -> list[Path]:
    """Image and video files under ``src`` (recursively), sorted by relative path for a stable
    order."""
    found = [p for p in src.rglob("*") if p.suffix.lower() in MEDIA_SUFFIXES and p.is_file()]
    return sorted(found, key=lambda p: p.relative_to(src).as_posix())


def _table_rows(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8-sig") as f:
            return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    raise ValueError(
        f"--captions-csv {path}: unknown table format {suffix!r}; give a "
        f"{', '.join(TABLE_SUFFIXES)} file"
    )


def _relative(value: Any, src: Path) -> str:
    # Table paths may be relative to SRC (the usual case) or absolute paths inside it.
    path = Path(os.path.normpath(str(value).strip()))
    if path.is_absolute():
        try:
            path = path.resolve().relative_to(src.resolve())
        except ValueError:
            return path.as_posix()  # outside SRC: reported as a row that names no image
    return path.as_posix()


def read_caption_table(
    path: str | Path, src: str | Path, path_col: str = "path", caption_col: str = "caption"
) -> dict[str, Caption]:
    """Captions by image path relative to ``src``, from a CSV, TSV or parquet table.

    Columns other than ``path_col`` and ``caption_col`` are kept and go into each sample's json.
    """
    path, src = Path(path), Path(src)
    if not path.is_file():
        raise FileNotFoundError(f"--captions-csv {path} does not exist")
    rows = _table_rows(path)
    columns = list(rows[0]) if rows else []
    for col, flag in ((path_col, "--path-col"), (caption_col, "--caption-col")):
        if col not in columns:
            raise ValueError(
                f"--captions-csv {path} has no column {col!r} (columns: {columns}); "
                f"name the right one with {flag}"
            )
    table: dict[str, Caption] = {}
    for line, row in enumerate(rows, start=2):  # line 1 is the CSV header
        rel = _relative(row[path_col], src)
        if rel in table:
            raise ValueError(f"--captions-csv {path}: {rel!r} appears twice (again at row {line})")
        caption = row[caption_col]
        extras = {k: v for k, v in row.items() if k not in (path_col, caption_col)}
        table[rel] = ("" if caption is None else str(caption).strip(), extras)
    return table


def _txt_caption(image: Path) -> Caption:
    txt = image.with_suffix(".txt")
    if not txt.is_file():
        return "", {}
    return txt.read_text(encoding="utf-8-sig", errors="replace").strip(), {}


def _header(data: bytes, suffix: str) -> tuple[str, int, int] | None:
    """Member name and (width, height) from the image (or video) header, None when PIL (or
    FFmpeg) cannot read it."""
    if suffix in VIDEO_SUFFIXES:
        try:
            info = probe(data)
        except VideoError:
            return None
        return VIDEO_SUFFIXES[suffix], info.width, info.height
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as image:
                member = FORMAT_MEMBERS.get(image.format or "", IMAGE_SUFFIXES[suffix])
                return member, *image.size
        except Exception:  # PIL raises many types for broken or oversized files
            return None


def _samples(
    images: Iterable[Path], src: Path, table: dict[str, Caption] | None, result: FolderResult
) -> Iterator[dict[str, Any]]:
    """Shard samples of the captioned images; what it skips is counted in ``result``."""
    for path in images:
        rel = path.relative_to(src).as_posix()
        result.images += 1
        caption, extras = table.get(rel, ("", {})) if table is not None else _txt_caption(path)
        if not caption:
            result.no_caption.append(rel)
            continue
        data = path.read_bytes()
        header = _header(data, path.suffix.lower())
        if header is None:
            result.unreadable.append(rel)
            continue
        member, width, height = header
        key = f"{result.written:09d}"
        size = {"width": width, "height": height}
        original = {"original_width": width, "original_height": height}
        # The fixed fields win over a table column of the same name: the loader relies on them.
        meta = extras | {"key": key, "caption": caption, **size, **original, "source": rel}
        result.written += 1
        yield {
            "__key__": key,
            member: data,
            "txt": caption,
            "json": json.dumps(meta, ensure_ascii=False, default=str),
        }


def update_sizes_file(folder: str | Path, sizes: dict[str, int]) -> Path:
    """Merge ``sizes`` (shard file name -> samples) into ``folder/sizes.json``, atomically."""
    path = Path(folder) / SIZES_FILE
    merged = read_json_map(str(path))  # {} when absent or unreadable: these counts replace it
    merged.update(sizes)
    tmp = path.with_name(f".{SIZES_FILE}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(dict(sorted(merged.items())), indent=1) + "\n")
    os.replace(tmp, path)
    return path


def _check_args(src: Path, out: Path, samples_per_shard: int, prefix: str) -> None:
    if not src.is_dir():
        raise FileNotFoundError(f"SRC {src} is not a folder")
    if samples_per_shard < 1:
        raise ValueError(f"--samples-per-shard={samples_per_shard} must be at least 1")
    if not prefix or "/" in prefix or os.sep in prefix:
        raise ValueError(f"--prefix={prefix!r} must be a non-empty file name part without '/'")
    existing = sorted(out.glob(f"{prefix}-*.tar"))
    if existing:
        raise FileExistsError(
            f"{out} already holds {len(existing)} {prefix}-*.tar shards ({existing[0].name} ...); "
            "remove them or pick another OUT or --prefix"
        )


def folder_to_shards(
    src: str | Path,
    out: str | Path,
    captions_table: str | Path | None = None,
    path_col: str = "path",
    caption_col: str = "caption",
    samples_per_shard: int = 1000,
    prefix: str = "shard",
    progress: bool = False,
) -> FolderResult:
    """Write the captioned images under ``src`` as ``out/{prefix}-000000.tar ...`` plus
    ``out/sizes.json``. Images without a caption, or whose header PIL cannot read, are skipped
    and listed in the result.

    Shards are written into a hidden folder inside ``out`` and moved into place only once all are
    complete, so an interrupted run leaves no partial shard under a final name.
    """
    src, out = Path(src), Path(out)
    _check_args(src, out, samples_per_shard, prefix)
    out.mkdir(parents=True, exist_ok=True)
    images = find_images(src)
    if not images:
        raise FileNotFoundError(f"SRC {src} holds no {'/'.join(MEDIA_SUFFIXES)} files")
    if captions_table is None and not any(p.with_suffix(".txt").is_file() for p in images):
        # Said before any image is read (and before the progress bar): nothing would be written.
        raise ValueError(f"none of the {len(images)} images under {src} has a NAME.txt caption "
                         "beside it; add NAME.txt captions or give --captions-csv")  # fmt: skip
    table, unmatched = None, []
    if captions_table is not None:
        table = read_caption_table(captions_table, src, path_col, caption_col)
        found = {p.relative_to(src).as_posix() for p in images}
        unmatched = [rel for rel in table if rel not in found]
    result = FolderResult(unmatched_rows=unmatched)
    bar = tqdm(images, desc="from-folder", unit="img", disable=not progress)
    tmp = Path(tempfile.mkdtemp(prefix=f".{prefix}-tmp-", dir=out))
    try:
        pattern = str(tmp / f"{prefix.replace('%', '%%')}-%06d.tar")
        files = write_shards(_samples(bar, src, table, result), pattern, samples_per_shard)
        if result.written == 0:
            raise ValueError(
                f"none of the {result.images} images under {src} has a caption and a readable "
                "header; add NAME.txt captions beside the images or give --captions-csv"
            )
        # Counted rather than assumed: the writer also starts a new shard at 3 GB.
        result.shards = {Path(f).name: count_tar_samples(f) for f in files}
        for f in files:
            os.replace(f, out / Path(f).name)
        # Last, so a sizes.json naming these shards means they are all in place.
        update_sizes_file(out, result.shards)
    finally:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return result
