"""Captions and filters from a sample's ``txt`` and ``json`` members (img2dataset layout)."""

from __future__ import annotations

import json
import random
from typing import Any

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")  # the image members read, in this order

Raw = dict[str, Any]


def sample_json(raw: Raw) -> dict[str, Any]:
    """The parsed ``json`` member (cached on the sample), ``{}`` when absent or unreadable."""
    if "__json__" not in raw:
        try:
            parsed = json.loads(raw["json"]) if raw.get("json") else {}
        except (ValueError, UnicodeDecodeError):
            parsed = {}
        raw["__json__"] = parsed if isinstance(parsed, dict) else {}
    return raw["__json__"]


def field(raw: Raw, name: str) -> Any:
    """``txt`` → the txt member; ``json.a.b`` → json["a"]["b"]; None when missing."""
    if name.startswith("json."):
        value: Any = sample_json(raw)
        for part in name.split(".")[1:]:
            if not isinstance(value, dict) or part not in value:
                return None
            value = value[part]
        return value
    value = raw.get(name)
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value


class CaptionPicker:
    """Chooses a caption among several fields with probabilities, with optional dropout.

    ``fields`` maps a field (``txt``, ``json.caption``, ``json.blip2.short`` ...) to its weight;
    a field missing from a sample is left out of that sample's draw. ``dropout`` replaces the
    caption with ``""`` (the unconditional prompt for classifier-free guidance).
    """

    def __init__(self, fields: dict[str, float] | str = "txt", dropout: float = 0.0) -> None:
        self.fields = {fields: 1.0} if isinstance(fields, str) else dict(fields)
        if not self.fields or any(w < 0 for w in self.fields.values()):
            raise ValueError(f"data.caption_fields={self.fields}: give fields with weights >= 0")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"data.caption_dropout={dropout} must be in [0, 1]")
        self.dropout = dropout

    def __call__(self, raw: Raw, rng: random.Random) -> str | None:
        found = []
        for name, weight in self.fields.items():
            value = field(raw, name)
            if isinstance(value, str) and value.strip() and weight > 0:
                found.append((value.strip(), weight))
        if not found:
            return None
        caption = rng.choices([c for c, _ in found], weights=[w for _, w in found])[0]
        return "" if rng.random() < self.dropout else caption

    def describe(self) -> str:
        return ", ".join(self.fields)


class MetadataFilter:
    """Keeps samples whose ``json`` metadata passes size, aspect and score thresholds.

    Sizes are the original image's (``original_width``/``original_height``, else
    ``width``/``height``). ``min_scores``/``max_scores`` map json fields (``json.aesthetic``,
    ``json.pwatermark`` ...) to bounds; a sample missing a thresholded field is dropped.
    """

    def __init__(
        self,
        min_width: int = 0,
        min_height: int = 0,
        min_aspect: float = 0.0,
        max_aspect: float = float("inf"),
        min_scores: dict[str, float] | None = None,
        max_scores: dict[str, float] | None = None,
    ) -> None:
        self.min_width, self.min_height = min_width, min_height
        self.min_aspect, self.max_aspect = min_aspect, max_aspect
        self.min_scores = dict(min_scores or {})
        self.max_scores = dict(max_scores or {})

    @property
    def needs_size(self) -> bool:
        return bool(self.min_width or self.min_height or self.min_aspect > 0) or (
            self.max_aspect != float("inf")
        )

    def reason(self, raw: Raw, size: tuple[int, int] | None) -> str | None:
        """Why the sample is dropped (a metric name), or None to keep it. ``size`` is (w, h)."""
        if self.needs_size and size is not None:
            w, h = size
            if w < self.min_width or h < self.min_height:
                return "small"
            if not self.min_aspect <= w / max(h, 1) <= self.max_aspect:
                return "aspect"
        for name, bound in self.min_scores.items():
            value = _number(field(raw, name))
            if value is None or value < bound:
                return "score"
        for name, bound in self.max_scores.items():
            value = _number(field(raw, name))
            if value is None or value > bound:
                return "score"
        return None


def metadata_size(raw: Raw) -> tuple[int, int] | None:
    """(width, height) of the original image according to the json, if it says."""
    meta = sample_json(raw)
    for wk, hk in (("original_width", "original_height"), ("width", "height")):
        w, h = _number(meta.get(wk)), _number(meta.get(hk))
        if w and h:
            return int(w), int(h)
    return None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
