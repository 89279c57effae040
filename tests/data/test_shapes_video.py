"""The moving-shapes demo clips: held-out colour/direction pairs, the checker on rendered and on
encoded-then-decoded clips, and `ldm-data demo-video`'s shards read back as clips."""

from __future__ import annotations

import json
import random
import sys

import numpy as np
import pytest
from cli_runner import run_cli

from data.datamodule import WebDatasetDataModule
from data.shapes import COLOURS, draw_shape
from data.shapes_video import (
    DIRECTIONS,
    all_motion_specs,
    heldout_motion_specs,
    heldout_pairs,
    parse_motion_caption,
    predict_clip,
    render_clip,
    score_clips,
    train_motion_specs,
)
from data.video import ClipSampler

OPPOSITE = {"left to right": "right to left", "right to left": "left to right",
            "top to bottom": "bottom to top", "bottom to top": "top to bottom"}  # fmt: skip


def test_held_out_pairs_leave_every_colour_and_direction_in_training() -> None:
    pairs = heldout_pairs(0)
    assert len(pairs) == 4 and len({c for c, _ in pairs}) == 4
    assert {d for _, d in pairs} == set(DIRECTIONS)
    held, train = heldout_motion_specs(0), train_motion_specs(0)
    assert len(held) == 36 and len(held) + len(train) == len(all_motion_specs()) == 216
    assert not set(held) & set(train)
    assert {s.colour for s in train} == set(COLOURS)
    assert {s.direction for s in train} == set(DIRECTIONS)
    assert heldout_pairs(1) != pairs
    assert parse_motion_caption(held[0].caption) == held[0]
    with pytest.raises(ValueError, match="not a moving-shapes caption"):
        parse_motion_caption("a red circle at the top left on a white background")


def test_the_checker_reads_colour_and_direction_of_every_combination() -> None:
    rng = np.random.default_rng(0)
    specs = all_motion_specs()
    clips = [render_clip(s, 32, 9, rng) for s in specs]
    assert score_clips(clips, specs) == {"colour": 1.0, "direction": 1.0, "all": 1.0}
    for clip, spec in zip(clips[:24], specs[:24], strict=True):  # played backwards
        assert predict_clip(clip[::-1])["direction"] == OPPOSITE[spec.direction]
    still = [draw_shape("red", "circle", "white", (0.5, 0.5), 0.3, 32)] * 9
    assert predict_clip(still) == {"colour": "red", "direction": None}
    empty = [draw_shape("red", "circle", "white", (2.0, 2.0), 0.3, 32)] * 9  # off the frame
    assert predict_clip(empty) == {"colour": None, "direction": None}


def test_demo_video_shards_decode_into_clips_the_checker_scores(tmp_path) -> None:
    from train.cli.data import main

    out = tmp_path / "moving"
    argv = ["ldm-data", "demo-video", str(out), "--num-samples", "12", "--samples-per-shard", "6"]
    proc = run_cli(lambda: sys.exit(main(argv[1:])), argv)
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["num_shards"], manifest["frames"], manifest["fps"]) == (2, 9, 8)
    assert f"shards: {out}/moving-shapes-{{000000..000001}}.tar" in proc.stdout
    held = set(json.loads((out / "heldout.json").read_text()))
    assert held == {s.caption for s in heldout_motion_specs(0)}

    sampler = ClipSampler(9, fps=8, random_start=False)  # the whole 9-frame clip
    dm = WebDatasetDataModule(str(out), resolution=32, batch_size=4, shuffle_buffer=0,
                              video=sampler)  # fmt: skip
    clips, specs = [], []
    for batch in dm.train_dataloader():
        assert batch["pixel_values"].shape == (4, 3, 9, 32, 32)
        assert not any(batch["skipped"].values())
        for pixels, caption in zip(batch["pixel_values"], batch["caption"], strict=True):
            assert caption not in held
            clips.append([pixels[:, i].numpy() for i in range(9)])
            specs.append(parse_motion_caption(caption))
    assert len(clips) == 12
    assert score_clips(clips, specs) == {"colour": 1.0, "direction": 1.0, "all": 1.0}
    random.Random(0).shuffle(specs)  # and the scores can fail: against other captions
    assert score_clips(clips, specs)["all"] < 0.75
