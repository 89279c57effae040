"""Procedural "a coloured shape moving across a background" clips, and a checker that scores a
clip's colour and direction of motion from its per-frame centroids.

The video counterpart of data/shapes.py (whose palette, shapes, drawing and shape finder it
reuses). Some colour/direction pairs are held out of training, every colour and direction
staying in it, so sampling a held-out caption tests whether a model composes the two.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import product

import numpy as np
from PIL import Image

from data.shapes import BACKGROUNDS, COLOURS, SHAPES, draw_shape, locate

# Unit steps (x, y) in image coordinates (y grows downwards).
DIRECTIONS: dict[str, tuple[int, int]] = {
    "left to right": (1, 0),
    "right to left": (-1, 0),
    "top to bottom": (0, 1),
    "bottom to top": (0, -1),
}
SIDE = 0.3  # the shape's size as a fraction of the frame
TRAVEL = (0.25, 0.75)  # where the centre starts and ends along the direction of motion
JITTER = 0.04  # of the start, the end and the cross-axis position
MIN_TRAVEL = 0.1  # a centroid moving less than this (of the frame) has no direction


@dataclass(frozen=True)
class MotionSpec:
    colour: str
    shape: str
    direction: str
    background: str

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} moving from {self.direction} on a " \
            f"{self.background} background"  # fmt: skip


def all_motion_specs() -> list[MotionSpec]:
    """Every combination, in a fixed order (6 * 3 * 4 * 3 = 216)."""
    return [MotionSpec(*combo) for combo in product(COLOURS, SHAPES, DIRECTIONS, BACKGROUNDS)]


def heldout_pairs(seed: int = 0) -> list[tuple[str, str]]:
    """One (colour, direction) pair per direction, four colours: held out of training."""
    colours = list(COLOURS)
    random.Random(seed).shuffle(colours)
    return list(zip(colours, DIRECTIONS, strict=False))


def heldout_motion_specs(seed: int = 0) -> list[MotionSpec]:
    pairs = set(heldout_pairs(seed))
    return [s for s in all_motion_specs() if (s.colour, s.direction) in pairs]


def train_motion_specs(seed: int = 0) -> list[MotionSpec]:
    pairs = set(heldout_pairs(seed))
    return [s for s in all_motion_specs() if (s.colour, s.direction) not in pairs]


def parse_motion_caption(caption: str) -> MotionSpec:
    """Inverse of :attr:`MotionSpec.caption`; raises ValueError for anything else."""
    for spec in all_motion_specs():
        if spec.caption == caption.strip():
            return spec
    raise ValueError(f"not a moving-shapes caption: {caption!r}")


def render_clip(
    spec: MotionSpec, size: int, frames: int, rng: np.random.Generator
) -> list[Image.Image]:
    """``frames`` RGB frames of the shape moving at constant speed from about a quarter of the
    frame to three quarters along its direction."""
    dx, dy = DIRECTIONS[spec.direction]
    start, end = (t + rng.uniform(-JITTER, JITTER) for t in TRAVEL)
    cross = 0.5 + rng.uniform(-2 * JITTER, 2 * JITTER)
    clip = []
    for i in range(frames):
        along = start + (end - start) * i / max(frames - 1, 1)
        # Negative steps run from the far side: "right to left" starts at x = 1 - start.
        x = (along if dx > 0 else 1 - along) if dx else cross
        y = (along if dy > 0 else 1 - along) if dy else cross
        clip.append(draw_shape(spec.colour, spec.shape, spec.background, (x, y), SIDE, size))
    return clip


def predict_clip(frames: Sequence[Image.Image | np.ndarray]) -> dict[str, str | None]:
    """The clip's colour (the most frequent per-frame colour) and direction: the axis and sign
    of the least-squares slope of the centroids over time (None when they move less than
    MIN_TRAVEL over the clip, or fewer than two frames show a shape)."""
    found = [(i, f) for i, f in enumerate(map(locate, frames)) if f is not None]
    if len(found) < 2:
        return {"colour": None, "direction": None}
    colour = Counter(f.colour for _, f in found).most_common(1)[0][0]
    t = np.array([i for i, _ in found], dtype=np.float64) / max(len(frames) - 1, 1)
    xy = np.array([f.centre for _, f in found])  # [n, 2]
    slope = np.polyfit(t, xy, 1)[0]  # travel over the whole clip, per axis
    axis = int(np.argmax(np.abs(slope)))
    if abs(slope[axis]) < MIN_TRAVEL:
        return {"colour": colour, "direction": None}
    step = (int(np.sign(slope[0])), 0) if axis == 0 else (0, int(np.sign(slope[1])))
    direction = next(name for name, d in DIRECTIONS.items() if d == step)
    return {"colour": colour, "direction": direction}


def score_clip(frames: Sequence[Image.Image | np.ndarray], spec: MotionSpec) -> dict[str, bool]:
    pred = predict_clip(frames)
    return {
        "colour": pred["colour"] == spec.colour,
        "direction": pred["direction"] == spec.direction,
    }


def score_clips(
    clips: Sequence[Sequence[Image.Image | np.ndarray]], specs: Sequence[MotionSpec]
) -> dict[str, float]:
    """Accuracy of colour and direction, and "all" (both right)."""
    if len(clips) != len(specs):
        raise ValueError(f"{len(clips)} clips but {len(specs)} specs")
    scores = [score_clip(c, s) for c, s in zip(clips, specs, strict=True)]
    if not scores:
        return {}
    out = {key: float(np.mean([s[key] for s in scores])) for key in ("colour", "direction")}
    out["all"] = float(np.mean([all(s.values()) for s in scores]))
    return out
