"""`ldm-sample EXPORT --prompt ... --out grid.png`: generate with diffusers' own pipeline (from
text, or from an image with --init-image, --mask; a LoRA with --lora); a video export's clips
with `--frames N --out clip.mp4`."""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from train.cli import sample_images, sample_video
from train.errors import (
    BAD_INPUT,
    ArgumentParser,
    ConfigError,
    bad_input,
    debug_flag,
    positive_int,
)

if TYPE_CHECKING:  # torch and diffusers load in load_pipeline: bad arguments fail in a second
    from diffusers import DiffusionPipeline
    from PIL import Image

# CLI names for diffusers' schedulers (class names), with the options that make each the sampler.
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "euler": ("EulerDiscreteScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
}
# What an export samples with when --scheduler is not given: DDIM for DDPM exports; a flow export
# (rectified flow) keeps its own sampler, the DDPM ones above cannot read a velocity.
DEFAULT_SCHEDULER = "ddim"


def check_export(export_dir: str | Path) -> Path:
    """`export_dir` is a diffusers pipeline folder (model_index.json naming its class), checked
    before torch and diffusers are imported. FileNotFoundError: what load_pipeline raised."""
    path = Path(export_dir)
    index = path / "model_index.json"
    run_export = "pass the export/ folder of a run, or write one with ldm-export CKPT OUT"
    to_export = "if it is a checkpoint, export it first: ldm-export CKPT OUT"
    if path.is_file():
        raise FileNotFoundError(f"{path} is a file, not an export folder; {to_export}")
    if not path.is_dir():
        raise FileNotFoundError(f"export folder {path} does not exist; {run_export}")
    if not index.is_file():
        is_ckpt = path.suffix == ".ckpt" or (path / "latest").is_file()
        hint = to_export if is_ckpt else run_export
        raise FileNotFoundError(f"{path} has no model_index.json: not a diffusers export; {hint}")
    try:
        name = json.loads(index.read_text()).get("_class_name")
    except (ValueError, AttributeError):
        name = None
    if not isinstance(name, str):
        raise FileNotFoundError(f"{index} names no pipeline class (_class_name): not a diffusers "
                          "export; export the run again with ldm-export CKPT OUT")  # fmt: skip
    return path


def is_flow_scheduler(scheduler: Any) -> bool:
    """Whether `scheduler` samples a rectified flow (velocity on x_t = (1-s) x0 + s eps):
    FlowMatch schedulers, and the solvers that take flow sigmas (DPM-Solver, UniPC) set to
    them. `from_config` keeps keys a class does not take, hence the signature."""
    cls = type(scheduler)
    if cls.__name__.startswith("FlowMatch"):
        return True
    takes = "use_flow_sigmas" in inspect.signature(cls.__init__).parameters
    config = scheduler.config
    reads_velocity = config.get("prediction_type") == "flow_prediction"
    return takes and bool(config.get("use_flow_sigmas")) and reads_velocity


def load_pipeline(
    export_dir: str | Path, scheduler: str | None = None, allow_pickle: bool = False
) -> DiffusionPipeline:
    """Load an export; pickle-based weights are refused unless `allow_pickle`. `scheduler`: a
    SCHEDULERS name (None: DDIM, or a flow export's own sampler)."""
    import diffusers

    from train.cli.console import quiet_loading

    export_dir = check_export(export_dir)
    quiet_loading()
    pipe = diffusers.DiffusionPipeline.from_pretrained(
        export_dir, use_safetensors=None if allow_pickle else True, **absent_parts(export_dir)
    )
    return set_scheduler(pipe, scheduler, export_dir)


def set_scheduler(
    pipe: DiffusionPipeline, scheduler: str | None, source: str | Path
) -> DiffusionPipeline:
    """`scheduler` (a SCHEDULERS name; None: DDIM, or a flow pipeline's own sampler) as the
    pipeline's sampler, no progress bar. `source` names the weights in the error."""
    import diffusers

    own = pipe.scheduler
    if not is_flow_scheduler(own):
        name, options = SCHEDULERS[scheduler or DEFAULT_SCHEDULER]
        pipe.scheduler = getattr(diffusers, name).from_config(own.config, **options)
    elif scheduler is not None:
        name, options = SCHEDULERS[scheduler]
        chosen = getattr(diffusers, name).from_config(own.config, **options)
        if not is_flow_scheduler(chosen):
            raise ConfigError(
                f"{source} samples a rectified flow with its {type(own).__name__}; "
                f"--scheduler {scheduler} ({name}) cannot: leave --scheduler out"
            )
        pipe.scheduler = chosen
    pipe.set_progress_bar_config(disable=True)
    return pipe


def absent_parts(export_dir: Path) -> dict[str, None]:
    """The components the export was saved without (model_index.json lists them as [null,
    null], e.g. SD3 without T5): from_pretrained refuses to load unless they are passed."""
    index = json.loads((export_dir / "model_index.json").read_text())
    return {k: None for k, v in index.items() if isinstance(v, list) and v[0] is None}


def call_kwargs(pipe: DiffusionPipeline) -> dict:
    """What the export's pipeline class needs in each call besides the prompts, steps, guidance
    and generator (PixArt: prompt length, no resolution binning, no caption cleaning)."""
    from train.models.backbones.pixart import PIPELINES, sampling_kwargs
    from train.models.conditioners.towers import sampling_kwargs as t5_kwargs

    if type(pipe).__name__ in PIPELINES:
        return sampling_kwargs(pipe.tokenizer.model_max_length)
    return t5_kwargs(pipe)  # SD3, Flux: the T5 length trained with


def generate(
    pipe: DiffusionPipeline,
    prompts: list[str],
    steps: int = 25,
    guidance_scale: float = 4.0,
    seed: int = 0,
    batch_size: int = 16,
    extra: dict | None = None,
) -> list[Image.Image]:
    """Images for `prompts`, one seeded generator for the whole list, in batches; `extra`: more
    call arguments (an init image, a mask, a strength)."""
    import torch

    generator = torch.Generator(device="cpu").manual_seed(seed)
    # Some pipelines also draw from the global RNG (SD3's ControlNet pipeline samples the control
    # image's VAE posterior there): seeded too, so that --seed reproduces the images.
    torch.manual_seed(seed)
    extra = {**call_kwargs(pipe), **(extra or {})}
    images: list[Image.Image] = []
    for i in range(0, len(prompts), batch_size):
        images += pipe(
            prompts[i : i + batch_size],
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=generator,
            output_type="pil",
            **extra,
        ).images
    return images


def warn_long_prompts(pipe: DiffusionPipeline, prompts: list[str]) -> None:
    """One short line of ours on stderr instead of diffusers' warning (it names CLIP whatever
    the encoder, and echoes the cut-off text once per batch) and the tokenizer's own."""
    from train.cli.console import TRUNCATION_RECORDS, drop_records
    from train.models.conditioners.text import long_prompts_note

    drop_records(TRUNCATION_RECORDS)
    note = long_prompts_note(pipe.tokenizer, prompts)
    if note:
        print(f"ldm-sample: {note}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="ldm-sample", description=__doc__)
    p.add_argument("export", help="a diffusers-layout folder written by ldm-train / ldm-export")
    p.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    p.add_argument("--out", default="grid.png",
                   help="PNG grid to write; a video export: .mp4, .gif or .png")  # fmt: skip
    p.add_argument("--num-per-prompt", type=positive_int, default=1)
    p.add_argument("--steps", type=positive_int, default=25)
    p.add_argument("--guidance-scale", "--cfg", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=None,
                   help="default: ddim; a flow-matching export's own sampler")  # fmt: skip
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="also load .bin/.ckpt weights (runs pickle: only for files you trust)",
    )
    p.add_argument("--vae-tiling", type=positive_int, default=None, metavar="TILE",
                   help="decode in overlapping tiles of TILE px (a quarter overlap): peak "
                   "memory follows the tile, for large images and clips")  # fmt: skip
    sample_images.add_arguments(p)
    sample_video.add_arguments(p)
    args = p.parse_args(argv)
    with bad_input("ldm-sample:", debug_flag(args)):
        check_export(args.export)  # before the imports of load_pipeline (seconds)
        sample_images.check_arguments(args)
        sample_video.check_arguments(args)
    from train.util import image_grid

    # OSError: diffusers refusing pickle-based weights, or a part missing from the export.
    with bad_input("ldm-sample:", debug_flag(args), (*BAD_INPUT, OSError)):
        pipe = load_pipeline(args.export, args.scheduler, args.allow_pickle)
        video = sample_video.is_video_export(args.export)
        if video:  # its first frame (--init-image) is the pipeline's own input
            image_kwargs = sample_video.call_kwargs(pipe, args)
        else:
            pipe, image_kwargs = sample_images.image_pipeline(pipe, args)
        if args.lora:
            sample_images.apply_lora(pipe, args.lora, args.lora_scale, args.export)
        if args.vae_tiling:
            from train.models.vae_tiling import VaeTiling

            VaeTiling(args.vae_tiling).apply(pipe.vae)
    warn_long_prompts(pipe, args.prompt)
    prompts = [pr for pr in args.prompt for _ in range(args.num_per_prompt)]
    if video:
        from train.tasks.clips import Clips

        frames = args.frames or sample_video.DEFAULT_FRAMES
        clips = sample_video.generate_clips(pipe, prompts, frames, args.steps,
                                            args.guidance_scale, args.seed,
                                            extra=image_kwargs)  # fmt: skip
        Clips(clips, args.fps).write(args.out)
        print(f"wrote {len(clips)} clips of {frames} frames to {args.out}")
        return
    images = generate(pipe, prompts, args.steps, args.guidance_scale, args.seed, extra=image_kwargs)
    if args.keep_unmasked:
        images = sample_images.keep_unmasked(pipe, image_kwargs, images, args.mask_blur)
    grid = image_grid(images, cols=args.num_per_prompt if args.num_per_prompt > 1 else None)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out)
    print(f"wrote {len(images)} samples to {args.out}")
