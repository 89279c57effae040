"""`ldm-eval EXPORT`: score an export. Without options, the shapes demo's held-out captions with
its checker; with ``--reference``, FID and KID against a set's reference features (and CLIP
score) on a prompt file or the set's captions, plus the shapes checker when every prompt is a
shapes caption.

The held-out (colour, shape, position, background) combinations never appear in training, so the
shapes scores measure compositional generalisation, not recall of training images.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from data.shapes import heldout_specs, parse_caption, score_many
from train.cli.reference_stats import add_feature_args, feature_from_args
from train.cli.sample import SCHEDULERS, check_export, generate, load_pipeline
from train.errors import (
    BAD_INPUT,
    ArgumentParser,
    ConfigError,
    bad_input,
    debug_flag,
    positive_int,
)
from train.util import image_grid


def evaluate_export(
    export_dir: str | Path,
    num_samples: int = 96,
    steps: int = 25,
    guidance_scale: float = 4.0,
    seed: int = 0,
    scheduler: str | None = None,
    heldout_seed: int = 0,
    grid_path: Path | None = None,
) -> dict[str, float]:
    """Generate `num_samples` images cycling over the held-out specs and score each attribute."""
    pipe = load_pipeline(export_dir, scheduler)
    specs = heldout_specs(seed=heldout_seed)
    chosen = [specs[i % len(specs)] for i in range(num_samples)]
    images = generate(pipe, [s.caption for s in chosen], steps, guidance_scale, seed)
    _write_grid(images, grid_path)
    scores = score_many(images, chosen)
    scores["num_samples"] = num_samples
    scores["num_heldout_captions"] = len({s.caption for s in chosen})
    return scores


def _write_grid(images: list, grid_path: Path | None) -> None:
    if grid_path is not None:
        grid_path.parent.mkdir(parents=True, exist_ok=True)
        image_grid(images[:64], cols=8).resize((8 * 64, 8 * 64), 0).save(grid_path)


def quality_inputs(args: argparse.Namespace) -> tuple:
    """(feature net, reference features, prompts): every input checked, before generation."""
    from train.evaluation.prompts import prompt_set
    from train.evaluation.reference import load_reference

    if not (args.clip_model or args.inception):
        raise ConfigError("--reference needs the extractor it was made with: --clip-model or "
                          "--inception")  # fmt: skip
    prompts = prompt_set(args.prompts, args.val_urls, args.num_samples, "--prompts",
                         "--reference needs --prompts FILE or --val-urls SHARDS (the set the "
                         "reference was made from)")  # fmt: skip
    feature = feature_from_args(args)
    reference = load_reference(args.reference, args.val_urls, feature)
    return feature, reference, prompts


def evaluate_quality(args: argparse.Namespace, inputs: tuple) -> dict[str, float]:
    """FID, KID (and CLIP score with --clip-model) of the export's images for the prompts."""
    from train.evaluation.metrics import ImageMetrics
    from train.evaluation.reference import check_resolution, images_to_uint8

    feature, reference, prompts = inputs
    pipe = load_pipeline(args.export, args.scheduler)
    images = generate(pipe, prompts[:1], 1, args.guidance_scale, args.seed)  # its size, cheaply
    check_resolution(args.reference, images[0].width, "--reference")
    images = generate(pipe, prompts, args.steps, args.guidance_scale, args.seed)
    _write_grid(images, args.grid)
    metrics = ImageMetrics(feature, reference, args.clip_model)
    for i in range(0, len(images), 32):
        metrics.update(images_to_uint8(images[i : i + 32]), prompts[i : i + 32])
    scores: dict[str, float] = metrics.compute()
    try:
        specs = [parse_caption(p) for p in prompts]
    except ValueError:  # not the shapes demo's captions: no checker
        specs = None
    if specs:
        scores.update({f"shapes_{k}": v for k, v in score_many(images, specs).items()})
    scores["num_samples"] = len(prompts)
    return scores


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="ldm-eval", description=__doc__)
    p.add_argument("export", help="a diffusers-layout export (a run's export/ or ldm-export's)")
    p.add_argument("--num-samples", type=positive_int, default=96)
    p.add_argument("--steps", type=positive_int, default=25)
    p.add_argument("--guidance-scale", "--cfg", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=None,
                   help="default: ddim; a flow-matching export's own sampler")  # fmt: skip
    p.add_argument("--grid", type=Path, default=None, help="also write the first 64 samples here")
    p.add_argument("--json", type=Path, default=None, help="write the scores here as JSON")
    q = p.add_argument_group("FID, KID and CLIP score (instead of the shapes held-out set)")
    q.add_argument("--reference", metavar="FILE", help="ldm-data stats of the real set")
    q.add_argument("--prompts", metavar="FILE", help="one prompt per line")
    q.add_argument("--val-urls", metavar="SHARDS",
                   help="the reference's set (checked); its captions are the prompts")  # fmt: skip
    add_feature_args(q, required=False)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    with bad_input("ldm-eval:", debug_flag(args)):
        check_export(args.export)  # before torch and diffusers are imported
        inputs = quality_inputs(args) if args.reference else None
    # OSError: diffusers refusing pickle-based weights, a part missing, a --grid not writable.
    with bad_input("ldm-eval:", debug_flag(args), (*BAD_INPUT, OSError)):
        if inputs is not None:
            scores = evaluate_quality(args, inputs)
        else:
            scores = evaluate_export(args.export, args.num_samples, args.steps,
                                     args.guidance_scale, args.seed, args.scheduler,
                                     grid_path=args.grid)  # fmt: skip
    text = json.dumps(scores, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
