"""Sampled clips as files: an mp4 (plays in browsers and MLflow's artifact viewer), an animated
GIF, and a frame strip PNG (one row per clip, one column per frame) for a quick look."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from train.util import image_grid

CLIP_SUFFIXES = (".mp4", ".gif", ".png")  # .png: one row per clip, one column per frame


class Clips:
    """Clips of PIL frames (one list per clip), played at `fps`."""

    def __init__(self, clips: Sequence[Sequence[Image.Image]], fps: int) -> None:
        if not clips or not all(clips):
            raise ValueError("Clips needs at least one clip of at least one frame")
        self.clips = [list(c) for c in clips]
        self.fps = fps

    @property
    def num_frames(self) -> int:
        return len(self.clips[0])

    def strip(self) -> Image.Image:
        """One row per clip, its frames left to right."""
        return image_grid([f for clip in self.clips for f in clip], cols=self.num_frames)

    def animated(self, cols: int | None = None) -> list[Image.Image]:
        """The clips side by side (a grid), frame by frame."""
        return [image_grid([clip[i] for clip in self.clips], cols) for i in range(self.num_frames)]

    def save(self, path: str | Path) -> list[Path]:
        """`path` (a PNG strip), and beside it `.mp4` and `.gif` of the clips in a grid; returns
        the files written."""
        path = Path(path)
        frames = self.animated()  # the grid of each frame, once for both
        return [self.write(path), self.write(path.with_suffix(".mp4"), frames),
                self.write(path.with_suffix(".gif"), frames)]  # fmt: skip

    def write(self, path: str | Path, frames: list[Image.Image] | None = None) -> Path:
        """One file, by its suffix: `.png` the strip, `.mp4` (H.264 4:2:0, which browsers play)
        or `.gif` (looping) the clips in a grid; `frames`: that grid's frames when known."""
        from data.shards_video import encode_mp4

        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in CLIP_SUFFIXES:
            raise ValueError(f"{path}: clips are written as {', '.join(CLIP_SUFFIXES)}")
        path.parent.mkdir(parents=True, exist_ok=True)
        if suffix == ".png":
            self.strip().save(path)
            return path
        frames = frames or self.animated()
        if suffix == ".mp4":
            even = [even_sized(f) for f in frames]
            path.write_bytes(encode_mp4(even, self.fps, pix_fmt="yuv420p"))
        else:
            frames[0].save(path, save_all=True, append_images=frames[1:],
                           duration=round(1000 / self.fps), loop=0)  # fmt: skip
        return path


def even_sized(image: Image.Image) -> Image.Image:
    """`image` padded to even sides (4:2:0 H.264 needs them)."""
    w, h = image.size
    if w % 2 == 0 and h % 2 == 0:
        return image
    out = Image.new(image.mode, (w + w % 2, h + h % 2))
    out.paste(image)
    return out
