"""Checkpointing, logging and each callback as a share of a real training run's wall time.

    python benchmarks/run_overhead.py [--steps 300] [--every 100] [overrides ...]

One `ldm-train` run (`train.cli.run.run`) of the demo experiment on generated shapes shards,
with every callback and the MLflow logger of the default config (a local store), a random-init
VAE of the stage-1 architecture, checkpoints every `--every` steps (plus `last.ckpt`) and
metrics every `trainer.log_every_n_steps`. A callback wraps `Trainer.save_checkpoint`, the
loggers' write methods and every other callback's per-step hooks with timers, so each cost is
measured where training waits for it, not estimated from runs with and without it (this
machine's run-to-run noise, several %, hides a callback's ~1 %, and a 2 % goal).

Prints the time in each, as a share of the training loop (first to last batch) and of the whole
fit (also the end-of-run previews and export), and writes benchmarks/results/run_overhead.json.
A callback's time includes the checkpoint writes and logger calls it makes (ModelCheckpoint's,
LearningRateMonitor's), so the rows overlap; "checkpoint + logging" counts each call once.
Trailing arguments are config overrides (e.g. an MLflow server's URI, to time the spool).
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
STEP_HOOKS = ("on_train_batch_start", "on_train_batch_end", "on_before_backward",
              "on_after_backward", "on_before_optimizer_step", "on_before_zero_grad")  # fmt: skip


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
        # Instance attributes shadow the methods that ModelCheckpoint, Lightning's logger
        # connector and its callback hooks call, so every call on the training path is timed.
        trainer.save_checkpoint = self._timed("checkpoint", trainer.save_checkpoint)
        for logger in trainer.loggers:
            for name in LOGGER_METHODS:
                setattr(logger, name, self._timed("logging", getattr(logger, name)))
        for callback in (c for c in trainer.callbacks if c is not self):
            kind = f"callback {type(callback).__name__}"
            for hook in STEP_HOOKS:
                if getattr(type(callback), hook) is getattr(L.Callback, hook):
                    continue  # not overridden: Lightning's no-op
                self.spent.setdefault(kind, 0.0)
                self.calls.setdefault(kind, 0)
                setattr(callback, hook, self._timed(kind, getattr(callback, hook)))

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
    steps = args.steps
    for kind, spent in sorted(spent_by.items(), key=lambda kv: -kv[1]):
        share_loop, share_fit = spent / loop, spent / fit
        result[kind] = {"s": spent, "calls": calls[kind], "ms_per_step": 1e3 * spent / steps,
                        "share_of_loop": share_loop, "share_of_fit": share_fit}  # fmt: skip
        print(f"{kind:42s} {spent:6.2f} s in {calls[kind]:5d} calls, "
              f"{1e3 * spent / steps:6.2f} ms/step: {share_loop:6.2%} of the loop")  # fmt: skip
    both = spent_by["checkpoint"] + spent_by["logging"]
    print(f"checkpoint + logging: {both:.2f} s, {both / loop:.2%} of the loop (goal <= 2 %)")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "run_overhead.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
