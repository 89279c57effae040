"""Video members (``mp4`` / ``webm`` / ``mkv``, the layout video2dataset writes): probing,
frame-count rules and clip sampling.

Decoded with PyAV: its wheels carry their own FFmpeg (H.264, VP8/9, AV1, FFV1 ...), so a
``pip install`` is all a machine needs, it reads from memory (a tar member's bytes, no temporary
file) and it is maintained. torchcodec loads the system's FFmpeg libraries (one more thing every
training image must have, and keep at a supported version); decord has had no release since 2022.
"""

from __future__ import annotations

import io
import random
from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image

VIDEO_KEYS = ("mp4", "webm", "mkv")


@dataclass(frozen=True)
class VideoInfo:
    """What a container's header says about its first video stream."""

    duration: float  # seconds
    fps: float
    width: int
    height: int
    frames: int  # the container's count; estimated from duration x fps where it has none


class VideoError(ValueError):
    """The member could not be opened or decoded as a video."""


def probe(data: bytes) -> VideoInfo:
    """The member's duration, frame rate, size and frame count, from its header (no decoding)."""
    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise VideoError("no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            fps = float(rate) if rate else 0.0
            if stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                duration = container.duration / av.time_base
            else:
                duration = 0.0
            frames = stream.frames or round(duration * fps)
            return VideoInfo(duration, fps, stream.width, stream.height, frames)
    except av.FFmpegError as exn:
        raise VideoError(f"{type(exn).__name__}: {exn}") from exn


@dataclass(frozen=True)
class FrameRule:
    """The frame counts a video model takes: ``multiple * k + offset`` (Wan and CogVideoX take
    4k+1: one frame, then groups of four for the VAE's 4x temporal compression; LTX-Video 8k+1;
    a per-frame image VAE any count: multiple=1)."""

    multiple: int = 1
    offset: int = 0

    def valid(self, n: int) -> bool:
        return n >= max(1, self.offset) and (n - self.offset) % self.multiple == 0

    def nearest(self, n: int) -> list[int]:
        """The valid counts either side of ``n`` (one where ``n`` is below the smallest)."""
        k = (n - self.offset) // self.multiple
        below, above = self.multiple * k + self.offset, self.multiple * (k + 1) + self.offset
        return [c for c in (below, above) if c >= max(1, self.offset)]

    def describe(self) -> str:
        if self.multiple == 1:
            return "any count"
        return f"{self.multiple}k+{self.offset}" if self.offset else f"multiples of {self.multiple}"


@dataclass(frozen=True)
class ClipSampler:
    """``num_frames`` frames ``1 / fps`` seconds apart (``fps=None``: the video's own rate),
    starting at a random time (training) or at the start. A clip shorter than that is skipped."""

    num_frames: int
    fps: float | None = None
    rule: FrameRule = FrameRule()
    random_start: bool = True

    def __post_init__(self) -> None:
        if self.num_frames < 1:
            raise ValueError(f"data.video.num_frames={self.num_frames}: must be at least 1")
        if not self.rule.valid(self.num_frames):
            near = " or ".join(str(c) for c in self.rule.nearest(self.num_frames))
            raise ValueError(
                f"data.video.num_frames={self.num_frames}: the model takes "
                f"{self.rule.describe()} frames (data.video.rule); the nearest valid counts "
                f"are {near}"
            )
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"data.video.fps={self.fps}: must be positive (or null: the "
                             "video's own rate)")  # fmt: skip

    def times(self, info: VideoInfo, rng: random.Random) -> list[float] | None:
        """The clip's frame times in seconds; None when the video is too short for them."""
        fps = self.fps or info.fps
        if fps <= 0 or info.fps <= 0:
            return None
        span = (self.num_frames - 1) / fps
        # The last frame is shown from duration - 1/fps: a 1 s clip at 8 fps spans 0 .. 0.875.
        available = info.duration - 1.0 / info.fps
        slack = available - span
        if slack < -0.5 / info.fps:  # half a source frame of rounding is not "too short"
            return None
        start = rng.uniform(0.0, max(slack, 0.0)) if self.random_start else 0.0
        return [start + i / fps for i in range(self.num_frames)]

    def needed(self, info: VideoInfo) -> float:
        """Seconds of video a clip needs (for the skip message)."""
        return (self.num_frames - 1) / (self.fps or info.fps or 1.0) + 1.0 / (info.fps or 1.0)


def decode_frames(data: bytes, times: list[float], period: float) -> list[Image.Image]:
    """The frames shown at ``times`` (seconds), as RGB images: the decoded frame nearest each
    time. Decodes from the keyframe before the first time to just past the last, never the
    whole video; raises VideoError when the stream ends early (a truncated file). ``period``:
    the source's frame period, 1 / fps."""
    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            if times[0] > 0 and stream.time_base is not None:
                container.seek(int(times[0] / stream.time_base), stream=stream)
            return _nearest_frames(container.decode(stream), times, period)
    except av.FFmpegError as exn:
        raise VideoError(f"{type(exn).__name__}: {exn}") from exn


def _nearest_frames(frames: Iterator, times: list[float], period: float) -> list[Image.Image]:
    """For each time, the frame whose timestamp is closest; keeps two decoded frames at most."""
    out: list[Image.Image] = []
    previous = None  # (time, frame) of the last frame before the next wanted time
    for frame in frames:
        if frame.time is None:
            continue
        while len(out) < len(times) and frame.time >= times[len(out)]:
            t = times[len(out)]
            closer = previous is not None and t - previous[0] < frame.time - t
            out.append((previous[1] if closer else frame).to_image())
        if len(out) == len(times):
            return out
        previous = (frame.time, frame)
    # The stream ended: its last frame stands for a time within half a frame past it (the
    # rounding ClipSampler.times allows).
    end = previous is not None and len(out) == len(times) - 1
    if end and times[-1] - previous[0] <= 0.5 * period + 1e-6:
        return [*out, previous[1].to_image()]
    last = f"{previous[0]:.3f} s" if previous else "no frame"
    raise VideoError(f"the video ends at {last}, before {times[-1]:.3f} s (truncated?)")
