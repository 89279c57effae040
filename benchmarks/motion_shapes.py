"""Does a video model move the prompted shape in the prompted direction? Generates a clip per
held-out caption of the moving-shapes demo (colour/direction pairs never seen in training) and
per training caption, and scores each with the centroid checker (data/shapes_video.py): the
colour seen most and the direction of the centroids' least-squares slope.

    python benchmarks/motion_shapes.py EXPORT [--heldout-seed 0] [--frames 8] [--steps 25]
        [--guidance-scale 1.5] [--train-captions 36] [--grid DIR] [--json FILE]

EXPORT: an AnimateDiff export (`make demo-video`'s RUN/export). Prints the scores, the sampling
wall time and the CPU model.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from machine import cpu_model  # benchmarks/machine.py, beside this script

from data.shapes_video import (
    DIRECTIONS,
    heldout_motion_specs,
    predict_clip,
    score_clips,
    train_motion_specs,
)
from train.cli.sample import load_pipeline
from train.tasks.clips import Clips


def sample(pipe, captions: list[str], args: argparse.Namespace) -> list[list]:
    """One clip per caption (PIL frames), a seeded generator per caption."""
    clips = []
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    for i in range(0, len(captions), 12):
        chunk = captions[i : i + 12]
        gens = [torch.Generator().manual_seed(args.seed + i + j) for j in range(len(chunk))]
        clips += pipe(chunk, num_frames=args.frames, num_inference_steps=args.steps,
                      guidance_scale=args.guidance_scale, generator=gens, height=size,
                      width=size, output_type="pil").frames  # fmt: skip
    return clips


def scores(clips: list[list], specs: list) -> dict[str, float]:
    """The checker's colour / direction / all, and "axis": the motion along the prompted axis
    (horizontal or vertical) whatever its sign, which tells a model that reads the direction's
    words but not their order ("left to right" vs "right to left") from one that reads neither."""
    out = score_clips(clips, specs)
    on_axis = [
        (p := predict_clip(c)["direction"]) is not None
        and (DIRECTIONS[p][0] != 0) == (DIRECTIONS[s.direction][0] != 0)
        for c, s in zip(clips, specs, strict=True)
    ]
    return out | {"axis": sum(on_axis) / len(on_axis)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("export")
    p.add_argument("--heldout-seed", type=int, default=0)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance-scale", type=float, default=1.5)
    p.add_argument("--train-captions", type=int, default=36, help="training captions scored")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", default=None, help="folder for the held-out clips (PNG, mp4, GIF)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    pipe = load_pipeline(args.export)
    held = heldout_motion_specs(args.heldout_seed)
    seen = random.Random(0).sample(train_motion_specs(args.heldout_seed), args.train_captions)
    start = time.perf_counter()
    held_clips = sample(pipe, [s.caption for s in held], args)
    seen_clips = sample(pipe, [s.caption for s in seen], args)
    wall = time.perf_counter() - start
    result = {
        "heldout": scores(held_clips, held),
        "train": scores(seen_clips, seen),
        "num_heldout": len(held),
        "num_train": len(seen),
        "frames": args.frames,
        "sampling_s": round(wall, 1),
        "cpu": cpu_model(),
    }
    print(json.dumps(result, indent=2))
    if args.grid:
        Clips(held_clips, fps=8).save(Path(args.grid) / "heldout.png")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
