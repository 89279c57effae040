"""What the Lightning path and each of our layers cost per training step, against a bare
PyTorch loop on the same module, batches and optimizer, measured side by side in one process.

    python benchmarks/lightning_overhead.py [--steps 60] [--warmup 10] [--rounds 2]
        [--experiment tiny] [overrides ...]      # trailing overrides go to the config

- **bare loop**: `module.diffusion_step` (our diffusion math: VAE encode, text encode, noise,
  loss), `backward`, gradient clipping as the trainer config sets it, optimizer and schedule
  step, `zero_grad`. Twice: with our per-sample noise (`SampleRNG`, one generator per row,
  keyed by seed, step and row: the same draws on any world size) and with one batch-wide
  `torch.randn` (what that reproducibility costs).
- **Lightning**: the same module in a `Trainer` with no callbacks, logger or checkpointing
  (the Trainer config's precision and clipping).
- **+ MLflow logger**: the config's logger (local store); **+ logger + callback**: the logger
  and one of `callbacks` (the config's, every_n as configured; the cost shown is over the
  logger's row); **ldm-train**: the logger and every callback.

Batches are read once and replayed (no loader time in any variant). A step's time is the mean
between step ends after `--warmup` steps; each variant runs `--rounds` times, interleaved, and the
fastest round counts. Periodic work (previews, checkpoints every N steps) that does not fall in
the window is not in these figures. Writes benchmarks/results/lightning_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from machine import cpu_model  # benchmarks/ is the script's folder, on sys.path

RESULTS = Path(__file__).parent / "results"


class BatchRNG:
    """SampleRNG's interface over torch's global generator: one draw for the whole batch."""

    def __init__(self, batch_size: int) -> None:
        self.n = batch_size

    def randn(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(self.n, *shape, dtype=dtype)

    def rand(self) -> torch.Tensor:
        return torch.rand(self.n)

    def randint(self, high: int) -> torch.Tensor:
        return torch.randint(0, high, (self.n,))


class StepClock(L.Callback):
    """perf_counter at every training batch end."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_train_batch_end(self, *args: Any) -> None:
        self.ends.append(time.perf_counter())


def mean_step(ends: list[float], warmup: int) -> float:
    window = ends[warmup:]
    return (window[-1] - window[0]) / (len(window) - 1)


def setup(args: argparse.Namespace, overrides: list[str], root: Path):
    """The composed config, a fresh module built from it, and `--batches` batches."""
    from hydra.utils import instantiate

    from train.cli.export import build_module
    from train.config.compose import compose

    cfg = compose([f"experiment={args.experiment}", f"paths.root={root}", "data.urls=" +
                   str(args.shards), f"trainer.max_steps={args.steps}", *overrides])  # fmt: skip
    dm = instantiate(cfg.data)
    dm.setup("fit")
    batches = []
    for batch in dm.train_dataloader():
        batch.pop("data_position", None)
        batches.append(batch)
        if len(batches) == args.batches:
            break
    return cfg, batches, lambda: build_module(cfg.model, cfg.seed)


def bare(module, batches: list[dict], steps: int, clip: float | None, per_sample: bool):
    from train.tasks.optim import optimizer_config

    params = [p for p in module.trainable.parameters() if p.requires_grad]
    opt = optimizer_config(params, module.optimizer_factory, module.lr_scheduler_factory)
    opt, sched = (opt["optimizer"], opt["lr_scheduler"]["scheduler"]) if isinstance(opt, dict) \
        else (opt, None)  # fmt: skip
    module.train()
    ends = []
    for step in range(steps):
        batch = batches[step % len(batches)]
        n = len(batch["key"])
        rng = module_rng(module, n, step) if per_sample else BatchRNG(n)
        loss = module.diffusion_step(batch, rng)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad(set_to_none=True)
        ends.append(time.perf_counter())
    return ends


def module_rng(module, n: int, step: int):
    from train.tasks.rng import SampleRNG

    return SampleRNG.for_rows(module.noise_seed, step, 0, n, module.device)


def lightning(cfg, module, batches, callbacks: list, loggers: list, steps: int) -> list[float]:
    clock = StepClock()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, precision=cfg.trainer.precision, max_steps=steps,
        gradient_clip_val=cfg.trainer.gradient_clip_val, logger=loggers or False,
        callbacks=[*callbacks, clock], enable_checkpointing=any(
            isinstance(c, L.pytorch.callbacks.Checkpoint) for c in callbacks),
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0, log_every_n_steps=cfg.trainer.log_every_n_steps,
        default_root_dir=cfg.paths.run_dir,
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=Replay(batches, steps))
    return clock.ends


class Replay(torch.utils.data.IterableDataset):
    def __init__(self, batches: list[dict], steps: int) -> None:
        self.batches, self.steps = batches, steps

    def __iter__(self):
        return (self.batches[i % len(self.batches)] for i in range(self.steps))

    def __len__(self) -> int:
        return self.steps


def variants(cfg, root: Path) -> dict[str, Any]:
    """name -> () -> (callbacks, loggers), each built fresh (a run folder of its own)."""
    from hydra.utils import instantiate

    from train.cli.run import build_loggers

    names = [n for n, c in cfg.callbacks.items() if c is not None]

    def loggers() -> list:
        return build_loggers(cfg.logger, root / "run", None)

    def one(name: str):  # with the logger: some log (the LR monitor refuses to run without)
        return lambda: ([instantiate(cfg.callbacks[name])], loggers())

    out: dict[str, Any] = {"Lightning": lambda: ([], [])}
    out["+ MLflow logger"] = lambda: ([], loggers())
    out |= {f"+ logger + {n}": one(n) for n in names}
    out["ldm-train (all)"] = lambda: ([instantiate(cfg.callbacks[n]) for n in names],
                                      build_loggers(cfg.logger, root / "run", None))  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="tiny")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batches", type=int, default=8, help="distinct batches replayed")
    parser.add_argument("--out", type=Path, default=RESULTS / "lightning_overhead.json")
    args, overrides = parser.parse_known_args()
    torch.manual_seed(0)
    L.pytorch.utilities.disable_possible_user_warnings()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        from data.shards import write_demo_shards

        args.shards = root / "shards"
        write_demo_shards(args.shards, num_samples=64, samples_per_shard=32, size=32, seed=1)
        cfg, batches, fresh = setup(args, overrides, root)
        clip = cfg.trainer.gradient_clip_val
        runs: dict[str, Any] = {
            "bare loop, batch-wide noise": lambda: bare(fresh(), batches, args.steps, clip, False),
            "bare loop": lambda: bare(fresh(), batches, args.steps, clip, True),
        }
        for name, parts in variants(cfg, root).items():
            runs[name] = lambda parts=parts: lightning(cfg, fresh(), batches, *parts(), args.steps)
        best: dict[str, float] = {}
        for _ in range(args.rounds):
            for name, run in runs.items():
                s = mean_step(run(), args.warmup)
                best[name] = min(best.get(name, s), s)
    report(args, best)


def report(args: argparse.Namespace, best: dict[str, float]) -> None:
    base, light = best["bare loop"], best["Lightning"]
    print(f"{cpu_model()}; experiment={args.experiment}, mean of steps {args.warmup + 1}-"
          f"{args.steps}, best of {args.rounds} rounds")
    logger = best["+ MLflow logger"]
    print(f"{'variant':<40} {'ms/step':>8} {'x bare':>7} {'+ms':>7}")
    for name, s in best.items():
        over = logger if name.startswith("+ logger +") else light
        extra = f"{(s - over) * 1e3:+7.2f}" if name.startswith(("+", "ldm")) else ""
        print(f"{name:<40} {s * 1e3:8.2f} {s / base:7.3f} {extra}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cpu": cpu_model(), "experiment": args.experiment,
                                    "ms_per_step": {k: v * 1e3 for k, v in best.items()}},
                                   indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
