"""Procedural "coloured shape on a background" captions and images, plus a programmatic checker.

The demo set is small enough to learn in CPU minutes, and because every caption is generated from
a :class:`ShapeSpec` the checker can score a generated image against the caption it was asked for.
A few attribute combinations are held out of training so that sampling them tests composition.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import product

import numpy as np
from PIL import Image, ImageDraw

# Saturated and far apart in RGB (> ~90 from each other, > ~110 from every background) so that a
# nearest-palette lookup survives JPEG, antialiasing and a blurry 32 px sample.
# Six hues at least ~150 apart in RGB: a first red/orange/purple/blue palette (~100 apart) was
# where short CPU-trained autoencoders confused colours, which then capped the demo's accuracy.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 230),
    "yellow": (240, 230, 30),
    "magenta": (220, 40, 220),
    "cyan": (30, 210, 230),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.27, 0.27),
    "top right": (0.73, 0.27),
    "bottom left": (0.27, 0.73),
    "bottom right": (0.73, 0.73),
    "center": (0.5, 0.5),
}

SHAPE_SCALE = 0.34  # side / diameter as a fraction of the image size
SCALE_JITTER = 0.10
CENTRE_JITTER = 0.04
SUPERSAMPLE = 4
# Ideal mask fill ratio inside the shape's bounding box.
FILL_RATIOS: dict[str, float] = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}
# Row-profile skewness below which a shape is the (upright) triangle: a quarter of the sharp
# triangle's -0.57, measured margins in _shape_from_alpha.
TRIANGLE_SKEW = -0.15
MIN_DIFF = 40.0  # RGB distance from the background that counts as "not background"
MIN_FG_FRACTION = 0.005  # fewer foreground pixels than this: nothing was drawn


@dataclass(frozen=True)
class ShapeSpec:
    """One caption's worth of attributes."""

    colour: str
    shape: str
    position: str
    background: str

    @property
    def caption(self) -> str:
        where = "in the center" if self.position == "center" else f"at the {self.position}"
        return f"a {self.colour} {self.shape} {where} on a {self.background} background"


def parse_caption(caption: str) -> ShapeSpec:
    """Inverse of :attr:`ShapeSpec.caption`; raises ValueError for anything else."""
    for spec in all_specs():
        if spec.caption == caption.strip():
            return spec
    raise ValueError(f"not a shapes-demo caption: {caption!r}")


def all_specs() -> list[ShapeSpec]:
    """Every combination, in a fixed order (6 * 3 * 5 * 3 = 270)."""
    return [
        ShapeSpec(c, s, p, b) for c, s, p, b in product(COLOURS, SHAPES, POSITIONS, BACKGROUNDS)
    ]


def _values_covered(specs: Iterable[ShapeSpec]) -> bool:
    specs = list(specs)
    return (
        {s.colour for s in specs} == set(COLOURS)
        and {s.shape for s in specs} == set(SHAPES)
        and {s.position for s in specs} == set(POSITIONS)
        and {s.background for s in specs} == set(BACKGROUNDS)
    )


def heldout_specs(seed: int = 0, fraction: float = 0.1) -> list[ShapeSpec]:
    """A deterministic subset to keep out of training; every single attribute value stays in the
    training set, so only the combination is new."""
    specs = all_specs()
    order = list(specs)
    random.Random(seed).shuffle(order)
    target = round(fraction * len(specs))
    held: list[ShapeSpec] = []
    for spec in order:
        if len(held) == target:
            break
        remaining = set(specs) - set(held) - {spec}
        if _values_covered(remaining):
            held.append(spec)
    return sorted(held, key=specs.index)


def train_specs(seed: int = 0, fraction: float = 0.1) -> list[ShapeSpec]:
    """The complement of :func:`heldout_specs`, in :func:`all_specs` order."""
    held = set(heldout_specs(seed, fraction))
    return [s for s in all_specs() if s not in held]


def render(spec: ShapeSpec, size: int, rng: np.random.Generator) -> Image.Image:
    """Draw ``spec`` as an RGB ``size`` x ``size`` image, antialiased by supersampling."""
    side = SHAPE_SCALE * (1.0 + rng.uniform(-SCALE_JITTER, SCALE_JITTER))
    ax, ay = POSITIONS[spec.position]
    centre = (ax + rng.uniform(-CENTRE_JITTER, CENTRE_JITTER),
              ay + rng.uniform(-CENTRE_JITTER, CENTRE_JITTER))  # fmt: skip
    return draw_shape(spec.colour, spec.shape, spec.background, centre, side, size)


def draw_shape(
    colour: str, shape: str, background: str, centre: tuple[float, float], side: float, size: int
) -> Image.Image:
    """One shape at ``centre`` (x, y as fractions of the image), ``side`` (a fraction of the
    image) wide, on a ``size`` x ``size`` background; antialiased by supersampling."""
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    cx, cy, half = centre[0] * big, centre[1] * big, side * big / 2
    box = (cx - half, cy - half, cx + half, cy + half)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return image.resize((size, size), Image.Resampling.LANCZOS)


def _nearest(value: np.ndarray, table: dict[str, tuple[float, ...]]) -> str:
    names = list(table)
    refs = np.asarray([table[n] for n in names], dtype=np.float64)
    return names[int(np.argmin(((refs - value) ** 2).sum(axis=1)))]


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64)
    raw = np.asarray(image)
    arr = raw.astype(np.float64)
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(1, 2, 0)  # CHW -> HWC
    if raw.dtype.kind == "f":
        # Float input is model output: [-1, 1] if anything is negative, else [0, 1]; samples
        # overshoot a little, hence the clip.
        if arr.min() < 0:
            arr = (arr + 1.0) * 127.5
        elif arr.max() <= 1.5:
            arr = arr * 255.0
        arr = np.clip(arr, 0.0, 255.0)
    return arr


def _soft_mask(arr: np.ndarray, bg: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-pixel foreground coverage in [0, 1] and the foreground colour, or None if empty."""
    dist = np.linalg.norm(arr - bg, axis=-1)
    if (dist > MIN_DIFF).mean() < MIN_FG_FRACTION:
        return None
    # The strongest half of the foreground is interior, away from blended edge pixels.
    core = dist > max(MIN_DIFF, 0.5 * float(dist.max()))
    fg = np.median(arr[core], axis=0)
    span = fg - bg
    alpha = np.clip(((arr - bg) @ span) / max(float(span @ span), 1e-6), 0.0, 1.0)
    hard = alpha > 0.5
    # Keep partial coverage only next to the shape so noise far away adds no area.
    near = hard.copy()
    near[1:] |= hard[:-1]
    near[:-1] |= hard[1:]
    near[:, 1:] |= hard[:, :-1]
    near[:, :-1] |= hard[:, 1:]
    alpha = np.where(near, alpha, 0.0)
    if hard.sum() < max(3, MIN_FG_FRACTION * hard.size):
        return None
    return alpha, fg


def _shape_from_alpha(alpha: np.ndarray) -> str:
    """Triangle by its vertical asymmetry, then circle vs square by how much of the box it fills.

    Fill ratio alone misreads blurred triangles: a 32 px VAE reconstruction rounds the apex off,
    the box shrinks and the ratio (0.5 sharp) reaches a circle's 0.79. The skewness of the row
    profile survives blur, which is symmetric: -0.57 for a sharp upright triangle, -0.24 or less
    on the demo VAE's reconstructions, within +-0.07 for circles and squares.
    """
    rows = alpha.sum(axis=1) / max(float(alpha.sum()), 1e-6)
    ys = np.arange(len(rows)) + 0.5
    mean = float((rows * ys).sum())
    std = float(np.sqrt((rows * (ys - mean) ** 2).sum()))
    skew = float((rows * (ys - mean) ** 3).sum()) / max(std**3, 1e-6)
    if skew < TRIANGLE_SKEW:
        return "triangle"
    # Sub-pixel extents: the widest row and tallest column of coverage, so a 10 px shape is not
    # rounded to a whole-pixel bounding box.
    area = float(alpha.sum())
    width = float(alpha.sum(axis=1).max())
    height = float(alpha.sum(axis=0).max())
    ratio = area / max(width * height, 1e-6)
    return min(("circle", "square"), key=lambda name: abs(FILL_RATIOS[name] - ratio))


@dataclass(frozen=True)
class Found:
    """The shape the checker sees in an image."""

    colour: str
    centre: tuple[float, float]  # x, y as fractions of the image
    alpha: np.ndarray  # per-pixel coverage [H, W] in [0, 1]


def background_of(arr: np.ndarray) -> np.ndarray:
    """The median colour of the image's border."""
    border = np.concatenate([arr[0], arr[-1], arr[1:-1, 0], arr[1:-1, -1]])
    return np.median(border, axis=0)


def locate(image: Image.Image | np.ndarray) -> Found | None:
    """The shape's colour, centre and coverage; None where nothing was drawn. Accepts what
    :func:`predict` accepts."""
    return _locate(_as_array(image))


def _locate(arr: np.ndarray) -> Found | None:
    found = _soft_mask(arr, background_of(arr))
    if found is None:
        return None
    alpha, fg = found
    h, w = alpha.shape
    ys, xs = np.mgrid[0:h, 0:w]
    total = float(alpha.sum())
    centre = (float(((xs + 0.5) * alpha).sum() / total / w),
              float(((ys + 0.5) * alpha).sum() / total / h))  # fmt: skip
    return Found(_nearest(fg, COLOURS), centre, alpha)


def predict(image: Image.Image | np.ndarray) -> dict[str, str | None]:
    """Predicted colour, position, shape and background names (None where nothing was found).

    Accepts a PIL image, an HWC uint8/float array, or a CHW array in [-1, 1] or [0, 1].
    """
    arr = _as_array(image)
    result: dict[str, str | None] = {
        "colour": None,
        "position": None,
        "shape": None,
        "background": _nearest(background_of(arr), BACKGROUNDS),
    }
    found = _locate(arr)
    if found is None:
        return result
    result["colour"] = found.colour
    result["position"] = _nearest(np.asarray(found.centre), POSITIONS)
    result["shape"] = _shape_from_alpha(found.alpha)
    return result


def score_image(image: Image.Image | np.ndarray, spec: ShapeSpec) -> dict[str, bool]:
    """Whether each attribute of ``spec`` is visible in ``image``; an empty image fails all."""
    pred = predict(image)
    empty = pred["colour"] is None
    return {
        "colour": not empty and pred["colour"] == spec.colour,
        "position": not empty and pred["position"] == spec.position,
        "shape": not empty and pred["shape"] == spec.shape,
        "background": not empty and pred["background"] == spec.background,
    }


def score_many(
    images: Sequence[Image.Image | np.ndarray], specs: Sequence[ShapeSpec]
) -> dict[str, float]:
    """Accuracy per attribute, plus "all" (every attribute right at once)."""
    if len(images) != len(specs):
        raise ValueError(f"{len(images)} images but {len(specs)} specs")
    if not specs:
        return {}
    scores = [score_image(img, spec) for img, spec in zip(images, specs, strict=True)]
    out = {key: float(np.mean([s[key] for s in scores])) for key in scores[0]}
    out["all"] = float(np.mean([all(s.values()) for s in scores]))
    return out
