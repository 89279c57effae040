"""ldm-sample's clips: `--frames N --out clip.mp4` for a video export (AnimateDiff), written as an
mp4, an animated GIF or a frame strip PNG by the suffix of --out (train.tasks.clips)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from train.errors import ConfigError, positive_int
from train.tasks.clips import CLIP_SUFFIXES

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline
    from PIL import Image

# Pipelines whose call takes num_frames and returns clips, by model_index.json's class name.
VIDEO_PIPELINES = ("AnimateDiffPipeline", "AnimateDiffSDXLPipeline")
DEFAULT_FRAMES = 16  # AnimateDiffPipeline's own


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--frames", type=positive_int, default=None,
                   help=f"a video export's frames per clip (default {DEFAULT_FRAMES})")  # fmt: skip
    p.add_argument("--fps", type=positive_int, default=8, help="frame rate of the mp4 / GIF")


def is_video_export(export_dir: str | Path) -> bool:
    index = json.loads((Path(export_dir) / "model_index.json").read_text())
    return index.get("_class_name") in VIDEO_PIPELINES


def check_arguments(args: argparse.Namespace) -> None:
    """ConfigError for clip arguments that do not fit the export (checked by check_export)."""
    suffix = Path(args.out).suffix.lower()
    if not is_video_export(args.export):
        if args.frames is not None or suffix in (".mp4", ".gif"):
            what = "--frames" if args.frames is not None else f"--out {args.out}"
            raise ConfigError(f"{what} is for video exports, but {args.export} is an image "
                              "pipeline: write a PNG grid (--out grid.png)")  # fmt: skip
        return
    if suffix not in CLIP_SUFFIXES:
        raise ConfigError(f"--out {args.out}: a video export writes {', '.join(CLIP_SUFFIXES)} "
                          "(mp4, animated GIF, or a frame strip PNG)")  # fmt: skip
    image_inputs = [flag for flag, value in (("--init-image", args.init_image), ("--mask",
                    args.mask), ("--control-image", args.control_image)) if value]  # fmt: skip
    if image_inputs:
        raise ConfigError(f"{image_inputs[0]} is for image exports; {args.export} generates "
                          "clips from text alone")  # fmt: skip


def generate_clips(
    pipe: DiffusionPipeline, prompts: list[str], frames: int, steps: int, guidance_scale: float,
    seed: int, batch_size: int = 8,
) -> list[list[Image.Image]]:  # fmt: skip
    """A clip (PIL frames) per prompt, one seeded generator for the whole list, in batches."""
    import torch

    generator = torch.Generator(device="cpu").manual_seed(seed)
    torch.manual_seed(seed)
    clips: list[list[Image.Image]] = []
    for i in range(0, len(prompts), batch_size):
        clips += pipe(prompts[i : i + batch_size], num_frames=frames, num_inference_steps=steps,
                      guidance_scale=guidance_scale, generator=generator,
                      output_type="pil").frames  # fmt: skip
    return clips
