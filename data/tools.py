"""``ldm-data inspect`` and ``ldm-data validate``: what a set of shards holds, and which samples
the loader would skip, found before a training run does."""

from __future__ import annotations

import bisect
import contextlib
import functools
import json
import multiprocessing
import random
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from data.decoders import IMAGE_KEYS, caption_text, image_size
from data.folder import update_sizes_file
from data.sources import count_tar_samples, is_remote, iter_raw_samples, resolve_shards
from data.transforms import SKIP_REASONS, ImageTooLarge, decode_image
from data.video import VIDEO_KEYS
from data.video_stats import VideoStats, check_video, video_key

# Histogram buckets are half-open: "64-127" holds 64 <= x < 128.
SIZE_EDGES = (64, 128, 256, 512, 1024, 2048)
SIZE_LABELS = ("<64", "64-127", "128-255", "256-511", "512-1023", "1024-2047", ">=2048")
ASPECT_EDGES = (0.5, 0.75, 0.9, 1.1, 1.34, 2.0)  # width / height
ASPECT_LABELS = ("<0.5", "0.5-0.75", "0.75-0.9", "0.9-1.1", "1.1-1.34", "1.34-2", ">=2")
# 77 is CLIP's token limit: captions past it are cut (words are a lower bound on tokens).
WORD_EDGES = (1, 5, 10, 20, 40, 77)
WORD_LABELS = ("0", "1-4", "5-9", "10-19", "20-39", "40-76", ">=77")
PERCENTILES = (5, 25, 50, 75, 95, 100)
NUM_EXAMPLES = 5
# The loader's skip reasons, and bad_json, which the loader tolerates (as "no metadata").
REASONS = (*SKIP_REASONS, "bad_json")
DEFAULT_MAX_PIXELS = 178_956_970  # data.max_pixels' default


def _histogram(values: Counter, edges: Sequence[float], labels: Sequence[str]) -> dict[str, int]:
    counts = dict.fromkeys(labels, 0)
    for value, n in values.items():
        counts[labels[bisect.bisect_right(edges, value)]] += n
    return counts


def _percentiles(values: Counter) -> dict[str, int]:
    """Nearest-rank percentiles of integer values given as value -> count."""
    total, seen, out = sum(values.values()), 0, {}
    pending = list(PERCENTILES)
    for value in sorted(values):
        seen += values[value]
        while pending and seen >= pending[0] / 100 * total:
            out[f"p{pending.pop(0)}"] = value
    return out


class _Inspector:
    """Accumulates the statistics of the samples it is shown (memory independent of count)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.inspected, self.no_size, self.no_caption = limit, 0, 0, 0
        self.members: Counter = Counter()
        self.widths: Counter = Counter()
        self.heights: Counter = Counter()
        self.aspects: Counter = Counter()
        self.words: Counter = Counter()
        self.examples: list[dict[str, str]] = []
        self.videos = VideoStats()
        self._rng = random.Random(0)
        self._captioned = 0

    def wants_more(self) -> bool:
        return self.limit <= 0 or self.inspected < self.limit

    def add(self, raw: dict[str, Any]) -> None:
        self.inspected += 1
        self.members.update(k for k in raw if not k.startswith("__"))
        vkey = video_key(raw)
        size = self.videos.add(raw[vkey]) if vkey else image_size(raw)
        if size is None or min(size) <= 0:
            self.no_size += 1
        else:
            self.widths[size[0]] += 1
            self.heights[size[1]] += 1
            self.aspects[size[0] / size[1]] += 1
        caption = caption_text(raw)
        self.words[len(caption.split())] += 1
        if not caption:
            self.no_caption += 1
            return
        # Reservoir sampling: examples from the whole inspected range, not only its start.
        self._captioned += 1
        example = {"key": str(raw.get("__key__")), "caption": caption}
        if len(self.examples) < NUM_EXAMPLES:
            self.examples.append(example)
        elif (j := self._rng.randrange(self._captioned)) < NUM_EXAMPLES:
            self.examples[j] = example

    def result(self) -> dict[str, Any]:
        present = Counter({w: n for w, n in self.words.items() if w > 0})
        return {
            "samples_inspected": self.inspected,
            "members": dict(self.members.most_common()),
            "width": _histogram(self.widths, SIZE_EDGES, SIZE_LABELS),
            "height": _histogram(self.heights, SIZE_EDGES, SIZE_LABELS),
            "aspect_ratio": _histogram(self.aspects, ASPECT_EDGES, ASPECT_LABELS),
            "no_size": self.no_size,
            "caption_words": {
                "histogram": _histogram(self.words, WORD_EDGES, WORD_LABELS),
                "percentiles": _percentiles(present),
                "missing": self.no_caption,
            },
            "examples": self.examples,
            **({"video": self.videos.result()} if self.videos.videos else {}),
        }


def _read_shard(url: str, inspector: _Inspector) -> tuple[int, int]:
    """Samples in the shard and tar errors met, showing samples to ``inspector`` while it wants."""
    errors: list[BaseException] = []

    def handler(exn: Exception) -> bool:
        errors.append(exn)
        return True  # count it and read on, as the loader does

    count = 0
    try:
        for raw in iter_raw_samples(url, handler):
            count += 1
            if inspector.wants_more():
                inspector.add(raw)
    except OSError as exn:  # the shard could not be opened at all
        errors.append(exn)
    return count, len(errors)


def inspect_shards(
    urls: str | list[str], samples: int = 5000, progress: bool = False
) -> dict[str, Any]:
    """Sample counts of every shard, and member, size, aspect and caption statistics of the
    first ``samples`` samples (0: all). Shards past those are counted from their tar headers."""
    shards = resolve_shards(urls)
    inspector = _Inspector(samples)
    counts: dict[str, int] = {}
    tar_errors = 0
    with tqdm(shards, desc="inspect", unit="shard", disable=not progress) as bar:
        for url in bar:
            if inspector.wants_more():
                counts[url], errors = _read_shard(url, inspector)
                tar_errors += errors
            else:
                counts[url] = count_tar_samples(url)
            bar.set_postfix(samples=sum(counts.values()), refresh=False)
    return {
        "shards": len(shards),
        "samples": sum(counts.values()),
        "tar_errors": tar_errors,
        **inspector.result(),
        "samples_per_shard": counts,
    }


def write_sizes(counts: dict[str, int]) -> tuple[list[Path], list[str]]:
    """Merge per-shard counts into ``sizes.json`` beside each local shard's folder.

    Returns the files written and the remote shards skipped (their folder cannot be written).
    """
    by_folder: dict[Path, dict[str, int]] = defaultdict(dict)
    remote: list[str] = []
    for url, n in counts.items():
        if is_remote(url) and not url.startswith("file://"):
            remote.append(url)
            continue
        path = Path(url.removeprefix("file://"))
        by_folder[path.parent][path.name] = n
    return [update_sizes_file(folder, sizes) for folder, sizes in by_folder.items()], remote


@dataclass(frozen=True)
class Problem:
    """One reason a sample (or, for ``tar_error``, a shard past some point) is unusable."""

    shard: str
    key: str | None
    reason: str
    detail: str = ""


def check_sample(raw: dict[str, Any], max_pixels: int) -> list[tuple[str, str]]:
    """(reason, detail) for everything the loader would reject in this raw sample."""
    problems: list[tuple[str, str]] = []
    image_key = next((k for k in (*IMAGE_KEYS, *VIDEO_KEYS) if k in raw), None)
    if image_key is None:
        members = sorted(k for k in raw if not k.startswith("__"))
        wanted = "/".join((*IMAGE_KEYS, *VIDEO_KEYS))
        problems.append(("missing_image", f"no {wanted} member; has {members}"))
    elif not raw[image_key]:
        problems.append(("empty_member", f"{image_key} is 0 bytes"))
    elif image_key in VIDEO_KEYS:
        problems += check_video(raw[image_key])
    else:
        try:
            decode_image(raw[image_key], max_pixels)
        except ImageTooLarge as exn:
            problems.append(("too_large", str(exn)))
        except Exception as exn:  # PIL raises many types for broken files
            problems.append(("decode_error", repr(exn)[:300]))
    if not caption_text(raw):
        problems.append(("missing_caption", "no txt member" if "txt" not in raw else "empty txt"))
    if "json" in raw:
        if not raw["json"]:
            problems.append(("empty_member", "json is 0 bytes"))
        else:
            try:
                if not isinstance(json.loads(raw["json"]), dict):
                    problems.append(("bad_json", "json is not an object"))
            except (ValueError, UnicodeDecodeError) as exn:
                problems.append(("bad_json", str(exn)[:300]))
    return problems


def validate_shard(url: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, list[Problem]]:
    """Samples read from one shard and the problems found in them (images fully decoded)."""
    problems: list[Problem] = []

    def handler(exn: Exception) -> bool:
        problems.append(Problem(url, None, "tar_error", repr(exn)[:300]))
        return True

    count = 0
    try:
        for raw in iter_raw_samples(url, handler):
            count += 1
            key = str(raw.get("__key__"))
            problems += [Problem(url, key, r, d) for r, d in check_sample(raw, max_pixels)]
    except OSError as exn:  # the shard could not be opened at all
        problems.append(Problem(url, None, "tar_error", repr(exn)[:300]))
    return count, problems


def _shard_results(
    shards: list[str], max_pixels: int, workers: int
) -> Iterator[tuple[int, list[Problem]]]:
    check = functools.partial(validate_shard, max_pixels=max_pixels)
    if workers <= 1 or len(shards) <= 1:
        yield from map(check, shards)
        return
    # spawn, not fork: the parent has torch loaded and may run threads (tqdm's monitor), and
    # forking a threaded process can deadlock the child.
    with multiprocessing.get_context("spawn").Pool(min(workers, len(shards))) as pool:
        # imap keeps shard order, so the report is the same for any number of workers.
        yield from pool.imap(check, shards)


@dataclass
class ValidationSummary:
    shards: int = 0
    samples: int = 0
    bad_samples: int = 0
    by_reason: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))
    examples: list[Problem] = field(default_factory=list)  # the first few, for the console

    @property
    def ok(self) -> bool:
        return not any(self.by_reason.values())


def validate_shards(
    urls: str | list[str],
    max_pixels: int = DEFAULT_MAX_PIXELS,
    workers: int = 1,
    report: str | Path | None = None,
    progress: bool = False,
    num_examples: int = 20,
) -> ValidationSummary:
    """Decode every sample of the shards and check its caption and json.

    Every problem goes to ``report`` (JSONL: shard, key, reason, detail) as it is found, so
    memory does not grow with the number of bad samples; the summary counts them per reason.
    """
    if workers < 1:
        raise ValueError(f"--workers={workers} must be at least 1")
    shards = resolve_shards(urls)
    summary = ValidationSummary(shards=len(shards))
    results = _shard_results(shards, max_pixels, workers)
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(open(report, "w")) if report is not None else None
        bar = stack.enter_context(
            tqdm(results, total=len(shards), desc="validate", unit="shard", disable=not progress)
        )
        for count, problems in bar:
            summary.samples += count
            summary.bad_samples += len({p.key for p in problems if p.key is not None})
            for problem in problems:
                summary.by_reason[problem.reason] += 1
                if sink is not None:
                    sink.write(json.dumps(asdict(problem)) + "\n")
            summary.examples += problems[: max(num_examples - len(summary.examples), 0)]
            bad = sum(summary.by_reason.values())
            bar.set_postfix(samples=summary.samples, problems=bad, refresh=False)
    return summary
