"""`ldm-eval EXPORT`: score samples for the shapes demo's held-out captions with its checker.

The held-out (colour, shape, position, background) combinations never appear in training, so the
scores measure compositional generalisation, not recall of training images.
"""

from __future__ import annotations

import json
from pathlib import Path

from data.shapes import heldout_specs, score_many
from train.cli.sample import SCHEDULERS, check_export, generate, load_pipeline
from train.errors import BAD_INPUT, ArgumentParser, bad_input, debug_flag, positive_int
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
    if grid_path is not None:
        grid_path.parent.mkdir(parents=True, exist_ok=True)
        image_grid(images[:64], cols=8).resize((8 * 64, 8 * 64), 0).save(grid_path)
    scores = score_many(images, chosen)
    scores["num_samples"] = num_samples
    scores["num_heldout_captions"] = len({s.caption for s in chosen})
    return scores


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="ldm-eval", description=__doc__)
    p.add_argument("export", help="a diffusers-layout export of a model trained on the demo shards")
    p.add_argument("--num-samples", type=positive_int, default=96)
    p.add_argument("--steps", type=positive_int, default=25)
    p.add_argument("--guidance-scale", "--cfg", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=None,
                   help="default: ddim; a flow-matching export's own sampler")  # fmt: skip
    p.add_argument("--grid", type=Path, default=None, help="also write the first 64 samples here")
    p.add_argument("--json", type=Path, default=None, help="write the scores here as JSON")
    args = p.parse_args(argv)
    with bad_input("ldm-eval:", debug_flag(args)):
        check_export(args.export)  # before torch and diffusers are imported
    # OSError: diffusers refusing pickle-based weights, a part missing, a --grid not writable.
    with bad_input("ldm-eval:", debug_flag(args), (*BAD_INPUT, OSError)):
        scores = evaluate_export(
            args.export,
            args.num_samples,
            args.steps,
            args.guidance_scale,
            args.seed,
            args.scheduler,
            grid_path=args.grid,
        )
    text = json.dumps(scores, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
