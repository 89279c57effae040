"""Where shards come from: URL patterns, list files, per-shard sample counts, opening streams.

A shard is any tar readable as a byte stream: a local path, ``pipe:COMMAND``, or a URL that
fsspec opens (``s3://``, ``gs://``, ``http(s)://``, ...). Sample counts per shard are needed up
front so every rank and worker can be given the same number of batches (see ``data.plan``).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import braceexpand
import fsspec

log = logging.getLogger(__name__)
HINT = "check the path or run `ldm-data demo DIR` to write the demo shards"


def is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def _missing(spec: str, detail: str) -> FileNotFoundError:
    return FileNotFoundError(f"data.urls={spec!r} {detail}; {HINT}")


def _resolve_one(spec: str) -> list[str]:
    if is_remote(spec):
        return list(braceexpand.braceexpand(spec))
    path = Path(spec).expanduser()
    if path.is_dir():
        shards = sorted(str(p) for p in path.glob("*.tar"))
        if not shards:
            raise _missing(spec, "is a directory with no .tar files")
        return shards
    if path.suffix == ".txt" and path.is_file():
        return _resolve_list_file(path)
    expanded = [os.path.expanduser(u) for u in braceexpand.braceexpand(spec)]
    if any(glob.has_magic(u) for u in expanded):
        shards = sorted({m for u in expanded for m in glob.glob(u)})
        if not shards:
            raise _missing(spec, "matched no shard files")
        return shards
    absent = [u for u in expanded if not os.path.exists(u)]
    if len(absent) == len(expanded):
        raise _missing(spec, "matched no shard files")
    if absent:
        shown = ", ".join(absent[:3]) + (" ..." if len(absent) > 3 else "")
        raise _missing(spec, f"names {len(absent)} missing shard files ({shown})")
    return expanded


def _resolve_list_file(path: Path) -> list[str]:
    shards: list[str] = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        # Relative entries are relative to the list file, so a dataset folder can be moved.
        if not is_remote(line) and not os.path.isabs(os.path.expanduser(line)):
            line = str(path.parent / line)
        shards.extend(_resolve_one(line))
    if not shards:
        raise _missing(str(path), "is a list file with no entries")
    return shards


def resolve_shards(urls: str | list[str]) -> list[str]:
    """Expand ``urls`` into shard URLs, checking that local ones exist.

    Accepts a brace pattern (``dir/shapes-{000000..000007}.tar``), a glob, a directory (all its
    ``*.tar``, sorted), a ``.txt`` list file (one URL, path or pattern per line), or a list of
    any of these. Remote URLs (``scheme://`` or ``pipe:``) pass through unchecked.
    """
    specs = [urls] if isinstance(urls, (str, Path)) else list(urls)
    if not specs:
        raise _missing(str(urls), "is empty")
    return [shard for spec in specs for shard in _resolve_one(str(spec))]


def open_shard(url: str) -> IO[bytes]:
    """A binary stream of one shard: local file, ``pipe:`` command, or any fsspec URL."""
    if url.startswith("pipe:"):
        import webdataset as wds  # here, not at the top: it imports torch (config checks don't)

        return wds.gopen(url, "rb")
    if "://" in url and not url.startswith("file://"):
        return fsspec.open(url, "rb").open()
    return open(url.removeprefix("file://"), "rb")


def _sample_key(member: str) -> str | None:
    # webdataset's grouping rule: the key is the path up to the first dot of the file name.
    from webdataset.tariterators import base_plus_ext

    prefix, _ = base_plus_ext(member)
    return prefix


def count_tar_samples(url: str) -> int:
    """Samples (distinct consecutive keys) in a tar, reading headers only where it can seek."""
    count, last = 0, None
    with open_shard(url) as stream:
        mode = "r|*" if not hasattr(stream, "seek") or not stream.seekable() else "r:*"
        try:
            with tarfile.open(fileobj=stream, mode=mode) as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    key = _sample_key(info.name)
                    if key is not None and key != last:
                        count, last = count + 1, key
        except (tarfile.TarError, EOFError, OSError) as exn:
            # A truncated or corrupt shard: count what is readable; the reader skips the rest
            # and counts it as tar_error.
            log.warning("shard %s is damaged after %d samples: %r", url, count, exn)
    return count


def _stats_file(url: str) -> str:
    # img2dataset writes NNNNN_stats.json beside NNNNN.tar with the number of samples written.
    return url[: -len(".tar")] + "_stats.json" if url.endswith(".tar") else ""


def _read_stats(url: str) -> int | None:
    stats = _stats_file(url)
    successes = read_json_map(stats).get("successes") if stats else None
    try:
        return int(successes) if successes is not None else None
    except (TypeError, ValueError):
        return None


class ShardSizes:
    """Sample counts per shard, from img2dataset's ``*_stats.json``, a ``sizes.json`` beside the
    shards (``{"shard.tar": n}``), or by reading the tar headers (local shards).

    Counts found by reading are cached in ``cache_file`` (keyed by path, size and mtime) so a
    thousand-shard dataset is scanned once, not at every start.
    """

    def __init__(
        self, cache_file: str | os.PathLike | None = None, sizes_file: str | None = None
    ) -> None:
        self.cache_file = Path(cache_file) if cache_file else None
        # An explicit {url or file name: count} map: the way to count `pipe:` shards.
        self.explicit: dict[str, Any] = read_json_map(sizes_file) if sizes_file else {}
        if sizes_file and not self.explicit:
            raise ValueError(f"data.sizes_file={sizes_file!r} is missing or not a JSON object")
        self._cache: dict[str, int] = {}
        self._counted = False  # whether the cache gained counts since it was read
        if self.cache_file is not None and self.cache_file.exists():
            try:
                self._cache = json.loads(self.cache_file.read_text())
            except ValueError:
                self._cache = {}

    def __call__(self, shards: list[str]) -> list[int]:
        sizes_files: dict[str, dict[str, Any]] = {}
        counts = [self._one(url, sizes_files) for url in shards]
        self._save()
        return counts

    def _one(self, url: str, sizes_files: dict[str, dict[str, Any]]) -> int:
        folder, name = os.path.split(url)
        for key in (url, name):
            if key in self.explicit:
                return int(self.explicit[key])
        if url.startswith("pipe:"):
            raise ValueError(
                f"no sample count for {url}: give data.sizes_file, a JSON file mapping each "
                "shard URL (or file name) to its sample count"
            )
        if folder not in sizes_files:
            sizes_files[folder] = _read_sizes_json(folder)
        if name in sizes_files[folder]:
            return int(sizes_files[folder][name])
        stats = _read_stats(url)
        if stats is not None:
            return stats
        if is_remote(url):
            raise ValueError(
                f"no sample count for remote shard {url}: write {folder}/sizes.json "
                '({"shard.tar": count, ...}, `ldm-data inspect --write-sizes` does it) or keep '
                "img2dataset's *_stats.json beside the shards"
            )
        stat = os.stat(url)
        cache_key = f"{os.path.abspath(url)}:{stat.st_size}:{int(stat.st_mtime)}"
        if cache_key not in self._cache:
            self._cache[cache_key] = count_tar_samples(url)
            self._counted = True
        return self._cache[cache_key]

    def _save(self) -> None:
        if self.cache_file is None or not self._counted:
            return
        self.cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_file.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(self._cache))
        os.replace(tmp, self.cache_file)
        self._counted = False


def _read_sizes_json(folder: str) -> dict[str, Any]:
    return read_json_map(f"{folder}/sizes.json" if folder else "sizes.json")


def read_json_map(path: str) -> dict[str, Any]:
    try:
        with fsspec.open(path, "r") if is_remote(path) else open(path) as f:
            return dict(json.load(f))
    except (OSError, ValueError, TypeError):  # missing, unreadable, or not a JSON object
        return {}


def iter_raw_samples(url: str, handler: Any) -> Iterator[dict[str, Any]]:
    """Raw samples of one shard (``{"__key__", "__url__", ext: bytes}``), webdataset's reader.

    ``handler`` sees the first error of the shard only: webdataset reports a truncated member
    both where it reads the member and where it reads the next header.
    """
    from webdataset.tariterators import group_by_keys, tar_file_expander

    errors: list[Exception] = []

    def first_only(exn: Exception) -> bool:
        errors.append(exn)
        return handler(exn) if len(errors) == 1 else True

    with open_shard(url) as stream:
        files = tar_file_expander([{"url": url, "stream": stream}], first_only)
        yield from group_by_keys(files, handler=first_only)
