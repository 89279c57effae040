"""Checkpointing and logging as a share of a real training run's wall time.

    python benchmarks/checkpoint_overhead.py [--steps 300] [--every 100] [overrides ...]

One `ldm-train` run (`train.cli.run.run`) of the demo experiment on generated shapes shards,
with every callback and the MLflow logger of the default config (a local store), a random-init
VAE of the stage-1 architecture, checkpoints every `--every` steps (plus `last.ckpt`) and
metrics every `trainer.log_every_n_steps`. A callback wraps `Trainer.save_checkpoint` and the
loggers' write methods with timers, so their cost is measured where training waits for it, not
estimated from two runs (this machine's run-to-run noise, several %, would hide a 2 % goal).

Prints the time in each, as a share of the training loop (first to last batch) and of the whole
fit (also the end-of-run previews and export), and writes
benchmarks/results/checkpoint_overhead.json. Trailing arguments are config overrides.
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
import time
from pathlib import Path

import lightning as L
from machine import cpu_model  # benchmarks/ is the script's folder, on sys.path

RESULTS = Path(__file__).parent / "results"
LOGGER_METHODS = ("log_metrics", "log_hyperparams", "save", "after_save_checkpoint", "finalize")


class Stopwatch(L.Callback):
    """Seconds spent in checkpoint writes and logger calls, and the loop's and fit's wall time."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.spent = {"checkpoint": 0.0, "logging": 0.0}
        self.calls = {"checkpoint": 0, "logging": 0}
        self.marks: dict[str, float] = {}

    def _timed(self, kind: str, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.spent[kind] += time.perf_counter() - start
                self.calls[kind] += 1

        return wrapper

    def setup(self, trainer, pl_module, stage: str) -> None:
        # Instance attributes shadow the methods that ModelCheckpoint and Lightning's logger
        # connector call, so every call on the training path is timed.
        trainer.save_checkpoint = self._timed("checkpoint", trainer.save_checkpoint)
        for logger in trainer.loggers:
            for name in LOGGER_METHODS:
                setattr(logger, name, self._timed("logging", getattr(logger, name)))

    def on_fit_start(self, trainer, pl_module) -> None:
        self.marks["fit_start"] = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.marks.setdefault("loop_start", time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # The last batch's end (its checkpoint and logging included): on_train_end would
        # also count the previews and export of the callbacks that run before this one.
        self.marks["loop_end"] = time.perf_counter()

    def on_fit_end(self, trainer, pl_module) -> None:
        self.marks["fit_end"] = time.perf_counter()
        figures = {"spent": self.spent, "calls": self.calls, "marks": self.marks}
        Path(self.out).write_text(json.dumps(figures))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=100, help="checkpoint every N steps")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from data.shards import write_demo_shards
    from train.cli.run import run
    from train.config.compose import compose

    with tempfile.TemporaryDirectory() as tmp:
        write_demo_shards(Path(tmp) / "shapes", num_samples=2048, size=32)
        out = Path(tmp) / "stopwatch.json"
        cfg = compose([
            "experiment=demo", f"data.urls={tmp}/shapes", "model/vae=tiny_2x",
            "~model.vae.pretrained_model_name_or_path", f"paths.root={tmp}",
            f"trainer.max_steps={args.steps}",
            f"callbacks.checkpoint.every_n_train_steps={args.every}",
            "+callbacks.stopwatch._target_=__main__.Stopwatch", f"+callbacks.stopwatch.out={out}",
            *args.overrides,
        ])  # fmt: skip
        run(cfg)
        report(json.loads(out.read_text()), args)


def report(watch: dict, args: argparse.Namespace) -> None:
    m, spent_by, calls = watch["marks"], watch["spent"], watch["calls"]
    loop, fit = m["loop_end"] - m["loop_start"], m["fit_end"] - m["fit_start"]
    result = {"cpu": cpu_model(), "steps": args.steps, "checkpoint_every": args.every,
              "overrides": args.overrides, "loop_s": loop, "fit_s": fit}  # fmt: skip
    print(f"CPU: {result['cpu']}; {args.steps} steps, a checkpoint every {args.every}")
    print(f"training loop {loop:.1f} s, whole fit {fit:.1f} s")
    for kind, spent in spent_by.items():
        share_loop, share_fit = spent / loop, spent / fit
        result[kind] = {"s": spent, "calls": calls[kind], "share_of_loop": share_loop,
                        "share_of_fit": share_fit}  # fmt: skip
        print(f"{kind:10s} {spent:6.2f} s in {calls[kind]:4d} calls: "
              f"{share_loop:.2%} of the loop, {share_fit:.2%} of the fit")  # fmt: skip
    both = sum(spent_by.values())
    print(f"together   {both:6.2f} s: {both / loop:.2%} of the loop (goal <= 2 %)")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "checkpoint_overhead.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
