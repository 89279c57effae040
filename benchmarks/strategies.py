"""Step time of the demo model under DDP, DeepSpeed ZeRO-2/3 and FSDP on 2 CPU processes.

    python benchmarks/strategies.py [--steps 40] [--warmup 10] [--strategies ddp ...]

Each strategy trains the demo experiment (its UNet and text encoder, a random-init VAE of the
stage-1 architecture, global batch 32 = 16 per process) through `train.cli.run.run`, with two gloo
processes started by Lightning's launcher. Rank 0 times optimizer steps after a warm-up (data
loading included, as in training). Prints a table and the ZeRO-2/DDP and ZeRO-3/DDP ratios,
and writes benchmarks/results/strategies.json. On CPU the ratios measure the extra
communication and bookkeeping of sharding, not the memory it saves on GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L

RESULTS = Path(__file__).parent / "results"


class StepTimer(L.Callback):
    """Wall time of each optimizer step on global rank 0, written as JSON at the end."""

    def __init__(self, warmup: int, out: str) -> None:
        self.warmup, self.out = warmup, out
        self.times: list[float] = []
        self._last: float | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._last is not None and trainer.global_step > self.warmup:
            self.times.append(now - self._last)
        self._last = now

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            Path(self.out).write_text(json.dumps(self.times))


def run_one(strategy: str, steps: int, warmup: int, shards: str, out: str) -> None:
    from train.cli.run import run
    from train.config.compose import compose

    cfg = compose(
        [
            "experiment=demo",
            f"data.urls={shards}",
            "model/vae=tiny",
            "~model.vae.pretrained_model_name_or_path",
            "logger=none",
            f"strategy={strategy}",
            "trainer.devices=2",
            f"trainer.max_steps={steps}",
            "trainer.enable_progress_bar=false",
            "batch.global_size=32",
            "callbacks.samples=null",
            "callbacks.export=null",
            "callbacks.checkpoint=null",
            "callbacks.progress=null",
            f"run_name=bench-{strategy}",
            "+callbacks.timer._target_=__main__.StepTimer",
            f"+callbacks.timer.warmup={warmup}",
            f"+callbacks.timer.out={out}",
        ]
    )
    run(cfg)


def measure(strategy: str, args: argparse.Namespace, shards: str, tmp: str) -> list[float]:
    out = os.path.join(tmp, f"{strategy}.json")
    env = os.environ | {"LDM_OUTPUT_DIR": tmp, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--one", strategy, "--shards", shards, "--out", out]
    cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{strategy} failed:\n{proc.stderr[-4000:]}")
    return json.loads(Path(out).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument(
        "--strategies", nargs="+", default=["ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp"]
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--shards", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # a child: rank 0 here, rank 1 re-runs this command under Lightning's launcher
        run_one(args.one, args.steps, args.warmup, args.shards, args.out)
        return

    from data.shards import write_demo_shards

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_demo_shards(Path(tmp) / "shapes", num_samples=2048, size=64)
        shards = str(Path(tmp) / "shapes")
        for strategy in args.strategies:
            times = measure(strategy, args, shards, tmp)
            results[strategy] = {
                "median_step_s": statistics.median(times),
                "mean_step_s": statistics.fmean(times),
                "steps_timed": len(times),
            }
            r = results[strategy]
            line = f"{strategy:18s} median step {r['median_step_s']:.3f} s"
            print(f"{line} (mean {r['mean_step_s']:.3f} s, {len(times)} steps)", flush=True)
    base = results.get("ddp", {}).get("median_step_s")
    if base:
        for name in args.strategies:
            if name != "ddp":
                ratio = results[name]["median_step_s"] / base
                results[name]["ratio_to_ddp"] = ratio
                print(f"{name}/ddp step-time ratio: {ratio:.2f}")
    RESULTS.mkdir(exist_ok=True)
    meta = {"cpu_count": os.cpu_count(), "global_batch": 32, "processes": 2}
    (RESULTS / "strategies.json").write_text(json.dumps({**meta, **results}, indent=2))


if __name__ == "__main__":
    main()
