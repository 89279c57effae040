"""Step time and memory per rank of the demo model under DDP, DeepSpeed ZeRO-2/3, FSDP and
FSDP2 on 2 CPU processes.

    python benchmarks/strategies.py [OVERRIDES] [--steps 40] [--warmup 10] [--strategies ddp ...]

Leading arguments are config overrides, e.g. a wider UNet whose weights and optimizer state
outweigh its activations: ``model.backbone.model.block_out_channels=[256,512,512]``.

Each strategy trains the demo experiment (its UNet and text encoder, a random-init VAE of the
stage-1 architecture (2x), global batch 32 = 16 per process unless --global-batch, AdamW) through
`train.cli.run.run`, with two gloo processes started by Lightning's launcher. Rank 0 times
optimizer steps after a warm-up (data loading included, as in training). Each rank reports the
trained parameters it holds and its peak resident memory while training (Linux's VmHWM, reset
when training starts, so model building does not count), and that peak above its memory at the
start of training: gradients, optimizer state, activations and communication buffers. Prints a
table and each strategy's ratio to DDP, and writes benchmarks/results/strategies.json. On CPU
the step-time ratios price the extra communication and bookkeeping of sharding; the memory
columns show what it saves.
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

    def on_train_start(self, trainer, pl_module) -> None:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak RSS, to now
        self.start_mib = proc_status_mib("VmRSS")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._last is not None and trainer.global_step > self.warmup:
            self.times.append(now - self._last)
        self._last = now

    def on_train_end(self, trainer, pl_module) -> None:
        from train.callbacks.ema import trainable_params
        from train.distributed.sharding import local_tensors

        held = local_tensors(trainer.strategy, trainable_params(pl_module))
        report = {
            "times": self.times,
            "params_total": sum(p.numel() for p in pl_module.trainable.parameters()),
            "params_held": sum(t.numel() for t in held),
            "peak_mib": proc_status_mib("VmHWM"),
            "start_mib": self.start_mib,
        }
        Path(f"{self.out}.rank{trainer.global_rank}").write_text(json.dumps(report))


def proc_status_mib(field: str) -> float:
    """A memory figure of this process from /proc/self/status (kB there), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def run_one(strategy: str, args: argparse.Namespace) -> None:
    from train.cli.run import run
    from train.config.compose import compose

    cfg = compose(
        [
            "experiment=demo",
            f"data.urls={args.shards}",
            "model/vae=tiny_2x",
            "~model.vae.pretrained_model_name_or_path",
            "logger=none",
            f"strategy={strategy}",
            "trainer.devices=2",
            f"trainer.max_steps={args.steps}",
            "trainer.enable_progress_bar=false",
            f"batch.global_size={args.global_batch}",
            "callbacks.samples=null",
            "callbacks.export=null",
            "callbacks.checkpoint=null",
            "callbacks.progress=null",
            f"run_name=bench-{strategy}",
            "+callbacks.timer._target_=__main__.StepTimer",
            f"+callbacks.timer.warmup={args.warmup}",
            f"+callbacks.timer.out={args.out}",
            *args.overrides,
        ]
    )
    run(cfg)


def measure(strategy: str, args: argparse.Namespace, shards: str, tmp: str) -> list[dict]:
    """Each rank's report (rank order) of one 2-process run of `strategy`."""
    out = os.path.join(tmp, f"{strategy}.json")
    env = os.environ | {"LDM_OUTPUT_DIR": tmp, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--one", strategy, "--shards", shards, "--out", out]
    cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup), *args.overrides,
            "--global-batch", str(args.global_batch)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{strategy} failed:\n{proc.stderr[-4000:]}")
    return [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(2)]


def summary(ranks: list[dict]) -> dict:
    times = ranks[0]["times"]
    return {
        "median_step_s": statistics.median(times),
        "mean_step_s": statistics.fmean(times),
        "steps_timed": len(times),
        "params_total": ranks[0]["params_total"],
        "params_held_per_rank": [r["params_held"] for r in ranks],
        "peak_mib_per_rank": [round(r["peak_mib"], 1) for r in ranks],
        "peak_above_start_mib_per_rank": [round(r["peak_mib"] - r["start_mib"], 1) for r in ranks],
    }


def table_row(name: str, r: dict, base: dict | None) -> str:
    ratio = f"{r['median_step_s'] / base['median_step_s']:.2f}x" if base else "-"
    held = "/".join(f"{n / 1e6:.2f}" for n in r["params_held_per_rank"])
    peak = "/".join(f"{m:.0f}" for m in r["peak_mib_per_rank"])
    above = "/".join(f"{m:.0f}" for m in r["peak_above_start_mib_per_rank"])
    return (f"| {name} | {r['median_step_s']:.3f} | {ratio} | {held} | {peak} | {above} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--strategies", nargs="+",
                        default=["ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp", "fsdp2"])
    parser.add_argument("overrides", nargs="*", help="config overrides for every run")
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--shards", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # a child: rank 0 here, rank 1 re-runs this command under Lightning's launcher
        run_one(args.one, args)
        return

    from data.shards import write_demo_shards

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_demo_shards(Path(tmp) / "shapes", num_samples=2048, size=64)
        shards = str(Path(tmp) / "shapes")
        for strategy in args.strategies:
            results[strategy] = summary(measure(strategy, args, shards, tmp))
            r = results[strategy]
            line = f"{strategy:18s} median step {r['median_step_s']:.3f} s"
            print(f"{line} (mean {r['mean_step_s']:.3f} s, {r['steps_timed']} steps)", flush=True)
    base = results.get("ddp")
    print(f"\ntrained parameters: {next(iter(results.values()))['params_total'] / 1e6:.2f} M")
    print("| strategy | median step s | / DDP | M params held (rank 0/1) | peak RSS MiB "
          "(rank 0/1) | peak above start of training MiB |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        if base and name != "ddp":
            r["ratio_to_ddp"] = r["median_step_s"] / base["median_step_s"]
        print(table_row(name, r, base))
    RESULTS.mkdir(exist_ok=True)
    meta = {"cpu_count": os.cpu_count(), "global_batch": args.global_batch, "processes": 2,
            "overrides": args.overrides}  # fmt: skip
    name = "strategies_overrides.json" if args.overrides else "strategies.json"
    (RESULTS / name).write_text(json.dumps({**meta, **results}, indent=2))


if __name__ == "__main__":
    main()
