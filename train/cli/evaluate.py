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
from train.cli.reference_stats import feature_from_args
from train.cli.sample import SCHEDULERS, check_export, generate, load_pipeline
from train.errors import BAD_INPUT, ArgumentParser, ConfigError, bad_input, debug_flag
from train.evaluation.options import add_evaluation_args, check_inputs
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
    return shapes_scores(pipe, num_samples, steps, guidance_scale, seed, heldout_seed, grid_path)


def shapes_scores(pipe, num_samples: int = 96, steps: int = 25, guidance_scale: float = 4.0,
                  seed: int = 0, heldout_seed: int = 0,
                  grid_path: Path | None = None) -> dict[str, float]:  # fmt: skip
    """The shapes checker's accuracy per attribute on the held-out captions, for a pipeline."""
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

    prompts = prompt_set(args.prompts, args.val_urls, args.num_samples, "--prompts", "")
    feature = feature_from_args(args)
    # None: check_inputs has matched it to --val-urls (no second scan of the shards' headers).
    reference = load_reference(args.reference, None, feature)
    return feature, reference, prompts


class QualityScorer:
    """FID, KID (and CLIP score with --clip-model) of a pipeline's images for the prompts, plus
    the shapes checker when every prompt is a shapes caption. Built once, scores many."""

    def __init__(self, args: argparse.Namespace, inputs: tuple) -> None:
        from train.evaluation.metrics import ImageMetrics

        self.args = args
        self.feature, reference, self.prompts = inputs
        self.metrics = ImageMetrics(self.feature, reference, args.clip_model)
        try:
            self.specs = [parse_caption(p) for p in self.prompts]
        except ValueError:  # not the shapes demo's captions: no checker
            self.specs = None
        self.resolution_checked = False

    def __call__(self, pipe, grid_path: Path | None = None) -> dict[str, float]:
        from train.evaluation.reference import check_resolution, images_to_uint8

        args = self.args
        if not self.resolution_checked:  # its size, cheaply: one image, one step
            probe = generate(pipe, self.prompts[:1], 1, args.guidance_scale, args.seed)
            check_resolution(args.reference, probe[0].width, "--reference")
            self.resolution_checked = True
        images = generate(pipe, self.prompts, args.steps, args.guidance_scale, args.seed)
        _write_grid(images, grid_path)
        for i in range(0, len(images), 32):
            self.metrics.update(images_to_uint8(images[i : i + 32]), self.prompts[i : i + 32])
        scores: dict[str, float] = self.metrics.compute()
        self.metrics.reset()  # the generated side only: the reference stays
        if self.specs:
            scores.update({f"shapes_{k}": v for k, v in score_many(images, self.specs).items()})
        scores["num_samples"] = len(self.prompts)
        return scores


def make_scorer(args: argparse.Namespace):
    """What scores a pipeline with these arguments; every input is checked here."""
    if args.reference:
        return QualityScorer(args, quality_inputs(args))

    def shapes(pipe, grid_path: Path | None = None) -> dict[str, float]:
        return shapes_scores(pipe, args.num_samples, args.steps, args.guidance_scale, args.seed,
                             grid_path=grid_path)  # fmt: skip

    return shapes


def watch(args: argparse.Namespace, score) -> list[dict]:
    """--watch: score the run's checkpoints as they appear, then its export."""
    from train.cli.eval_watch import RunTracker, Watcher
    from train.cli.export import checkpoint_pipeline, load_checkpoint
    from train.cli.sample import set_scheduler

    def from_checkpoint(path: Path):
        pipe = checkpoint_pipeline(load_checkpoint(path, args.allow_pickle))
        return set_scheduler(pipe, args.scheduler, path)

    run_dir = Path(args.export)
    watcher = Watcher(run_dir, score, from_checkpoint, lambda p: load_pipeline(p, args.scheduler),
                      RunTracker(run_dir, args.tracking_uri), args.poll_seconds,
                      args.idle_timeout)  # fmt: skip
    return watcher.run()


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="ldm-eval", description=__doc__)
    p.add_argument("export", metavar="EXPORT_OR_RUN",
                   help="a diffusers-layout export (a run's export/ or ldm-export's); with "
                   "--watch, a run folder")  # fmt: skip
    p.add_argument("--watch", action="store_true",
                   help="EXPORT_OR_RUN is a run folder: score each new checkpoints/step_*.ckpt, "
                   "log eval/* to the run's MLflow run at its step, stop after its export")
    p.add_argument("--grid", type=Path, default=None, help="also write the first 64 samples here")
    p.add_argument("--json", type=Path, default=None, help="write the scores here as JSON")
    add_evaluation_args(p, sorted(SCHEDULERS))
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    with bad_input("ldm-eval:", debug_flag(args)):
        if args.watch:
            check_run_dir(args.export)
        else:
            check_export(args.export)  # before torch and diffusers are imported
        check_inputs(args)
        score = make_scorer(args)
    # OSError: diffusers refusing pickle-based weights, a part missing, a --grid not writable.
    with bad_input("ldm-eval:", debug_flag(args), (*BAD_INPUT, OSError)):
        if args.watch:
            records = watch(args, score)
            print(f"{len(records)} evaluations in {Path(args.export) / 'eval' / 'scores.jsonl'}")
            return
        scores = score(load_pipeline(args.export, args.scheduler), grid_path=args.grid)
    text = json.dumps(scores, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


def check_run_dir(path: str) -> None:
    """--watch takes a run folder (it may not exist yet: the job can start before the run)."""
    run_dir = Path(path)
    if (run_dir / "model_index.json").is_file():
        raise ConfigError(f"{run_dir} is an export; --watch takes the run folder that holds "
                          "checkpoints/ (e.g. outputs/runs/<run>), or drop --watch")  # fmt: skip
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(
            f"--watch {run_dir}: not a folder; give a run folder (outputs/runs/<run>)"
        )
