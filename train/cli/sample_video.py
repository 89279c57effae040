"""ldm-sample's clips: `--frames N --out clip.mp4` for a video export (AnimateDiff, Wan), written
as an mp4, an animated GIF or a frame strip PNG by the suffix of --out (train.tasks.clips)."""

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
VIDEO_PIPELINES = (
    "AnimateDiffPipeline", "AnimateDiffSDXLPipeline", "WanPipeline", "WanImageToVideoPipeline"
)
FIRST_FRAME_PIPELINES = ("WanImageToVideoPipeline",)  # called with the clip's first frame
DEFAULT_FRAMES = 17  # 4k+1: every video family's VAE takes it (AnimateDiff's own is 16)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--frames", type=positive_int, default=None,
                   help=f"a video export's frames per clip (default {DEFAULT_FRAMES})")  # fmt: skip
    p.add_argument("--fps", type=positive_int, default=8, help="frame rate of the mp4 / GIF")
    p.add_argument("--size", type=positive_int, default=None,
                   help="a video export's frame side in pixels (default: the trained size, "
                   "where the export records it)")  # fmt: skip


def export_class(export_dir: str | Path) -> str | None:
    return json.loads((Path(export_dir) / "model_index.json").read_text()).get("_class_name")


def is_video_export(export_dir: str | Path) -> bool:
    return export_class(export_dir) in VIDEO_PIPELINES


def recorded_size(export_dir: str | Path) -> bool:
    """Whether the export's denoiser config states its sample size (a UNet's does, Wan's
    transformer has none: it takes any size)."""
    for part in ("unet", "transformer"):
        config = Path(export_dir) / part / "config.json"
        if config.is_file():
            return json.loads(config.read_text()).get("sample_size") is not None
    return False


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
    name = export_class(args.export)
    first_frame = name in FIRST_FRAME_PIPELINES
    if first_frame and not args.init_image:
        raise ConfigError(f"{args.export} is an image-to-video export ({name}): give the clips' "
                          "first frame with --init-image IMAGE")  # fmt: skip
    given = (("--init-image", args.init_image), ("--mask", args.mask),
             ("--control-image", args.control_image), ("--strength", args.strength))  # fmt: skip
    first = ("--init-image",) if first_frame else ()
    image_inputs = [flag for flag, value in given if value and flag not in first]
    if image_inputs:
        raise ConfigError(f"{image_inputs[0]} is for image exports; {args.export} generates "
                          "clips from text alone")  # fmt: skip
    if args.size is None and not recorded_size(args.export):
        raise ConfigError(f"{args.export} ({name}) does not record the size it was trained at: "
                          "give --size (the run's data.resolution)")  # fmt: skip


def call_kwargs(pipe: DiffusionPipeline, args: argparse.Namespace) -> dict:
    """The pipeline call's size, text length and first frame (ldm-sample's clip arguments)."""
    import inspect

    from train.cli.sample_images import denoiser, read_image

    factor = getattr(pipe, "vae_scale_factor", None) or pipe.vae_scale_factor_spatial
    size = args.size or int(denoiser(pipe).config.sample_size) * int(factor)
    kwargs: dict = {"height": size, "width": size}
    if "max_sequence_length" in inspect.signature(pipe.__call__).parameters:
        # The length training padded to: Wan's transformer attends to every padded position.
        kwargs["max_sequence_length"] = int(pipe.tokenizer.model_max_length)
    if args.init_image:
        kwargs["image"] = read_image(args.init_image, "--init-image", size)
    return kwargs


def generate_clips(
    pipe: DiffusionPipeline, prompts: list[str], frames: int, steps: int, guidance_scale: float,
    seed: int, batch_size: int = 8, extra: dict | None = None,
) -> list[list[Image.Image]]:  # fmt: skip
    """A clip (PIL frames) per prompt, one seeded generator for the whole list, in batches;
    ``extra``: further call arguments (:func:`call_kwargs`)."""
    import torch

    generator = torch.Generator(device="cpu").manual_seed(seed)
    torch.manual_seed(seed)
    clips: list[list[Image.Image]] = []
    for i in range(0, len(prompts), batch_size):
        clips += pipe(prompt=prompts[i : i + batch_size], num_frames=frames,
                      num_inference_steps=steps, guidance_scale=guidance_scale,
                      generator=generator, output_type="pil", **(extra or {})).frames  # fmt: skip
    return clips
