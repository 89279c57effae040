"""Video members in ``ldm-data inspect`` (durations, frame rates, sizes, frame counts) and
``ldm-data validate`` (every frame decoded)."""

from __future__ import annotations

import io
from collections import Counter
from typing import Any

from data.video import VIDEO_KEYS, VideoError, probe

PERCENTILES = (5, 50, 95, 100)


def video_key(raw: dict[str, Any]) -> str | None:
    return next((k for k in VIDEO_KEYS if k in raw), None)


def _percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {}
    pick = [ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]
            for p in PERCENTILES]  # fmt: skip
    return {f"p{p}": round(v, 3) for p, v in zip(PERCENTILES, pick, strict=True)}


class VideoStats:
    """What the inspected video members hold. Memory grows with the distinct values (frame
    rates, sizes) and the duration list, one float per video."""

    def __init__(self) -> None:
        self.videos, self.unreadable = 0, 0
        self.durations: list[float] = []
        self.frames: list[float] = []
        self.fps: Counter = Counter()
        self.sizes: Counter = Counter()
        self.codecs: Counter = Counter()

    def add(self, data: bytes) -> tuple[int, int] | None:
        """Counts one member; returns its (w, h), or None when its header does not read."""
        self.videos += 1
        try:
            info = probe(data)
        except VideoError:
            self.unreadable += 1
            return None
        self.durations.append(info.duration)
        self.frames.append(info.frames)
        self.fps[round(info.fps, 3)] += 1
        self.sizes[f"{info.width}x{info.height}"] += 1
        return info.width, info.height

    def result(self) -> dict[str, Any]:
        return {
            "videos": self.videos,
            "unreadable": self.unreadable,
            "duration_s": _percentiles(self.durations),
            "frames": _percentiles(self.frames),
            "fps": {f"{k:g}": n for k, n in self.fps.most_common()},
            "sizes": dict(self.sizes.most_common(10)),
        }


def check_video(data: bytes) -> list[tuple[str, str]]:
    """(reason, detail) when the member does not open, or its frames end before its header
    says (a truncated file): every frame is decoded, as ``ldm-data validate`` decodes images."""
    import av

    try:
        info = probe(data)
        with av.open(io.BytesIO(data)) as container:
            decoded = sum(1 for _ in container.decode(container.streams.video[0]))
    except (VideoError, av.FFmpegError) as exn:
        return [("decode_error", f"{type(exn).__name__}: {exn}"[:300])]
    if decoded == 0 or decoded < info.frames - 1:  # a frame of rounding in estimated counts
        return [("decode_error", f"decoded {decoded} of the {info.frames} frames its header "
                 f"declares ({info.duration:.2f} s at {info.fps:g} fps): truncated?")]  # fmt: skip
    return []
