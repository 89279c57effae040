"""Speed-up of each speed switch on one training step of a backbone, and how far its loss moves
from the plain run's on the same batches.

    python benchmarks/speed_switches.py [--experiment demo] [--steps 20] [--batch 32]
    python benchmarks/speed_switches.py --device cuda --bf16 model/backbone=unet_sd2 ...

Variants: plain (AdamW with torch's default foreach kernels), fused AdamW (`fused=True`),
channels_last (`callbacks.speed.channels_last`), torch.compile per block
(`callbacks.speed.compile_blocks`), and all three. Each variant trains a fresh copy of the same
initial weights on the same fixed batches (random latents [B, 4, 16, 16] and text states
[B, 32, D]), so the losses of step k are comparable: the table gives the largest relative
difference to plain over the steps. Step time is the median after `--warmup` steps; a compiled
variant's first steps (its compile time) are reported apart. Writes
benchmarks/results/speed_switches.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from machine import cpu_model  # benchmarks/ is the script's folder, on sys.path

from train.callbacks.speed import compile_blocks, to_channels_last
from train.models.conditioning import Conditioning

RESULTS = Path(__file__).parent / "results"
VARIANTS = {
    "plain": {},
    "fused AdamW": {"fused": True},
    "channels_last": {"channels_last": True},
    "compile per block": {"compile": True},
    "all three": {"fused": True, "channels_last": True, "compile": True},
}


def build(args: argparse.Namespace, overrides: list[str]):
    from hydra.utils import instantiate

    from train.config.compose import compose

    return instantiate(compose([f"experiment={args.experiment}", *overrides]).model.backbone)


def train(backbone, batches, switches: dict, args: argparse.Namespace) -> tuple[list, list]:
    """Per-step (seconds, loss) of `backbone` (a fresh copy) with these switches."""
    dev = torch.device(args.device)
    torch._dynamo.reset()  # each variant compiles afresh, within its own recompile budget
    backbone = copy.deepcopy(backbone).to(dev)
    if switches.get("channels_last"):
        to_channels_last(backbone.model)
    model = backbone.model
    if switches.get("compile"):
        compile_blocks(model, backbone.wrap_units(), {})
    opt = torch.optim.AdamW(backbone.parameters(), lr=1e-4, fused=switches.get("fused"))
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        x, t, cond, target = batches[step % len(batches)]
        if dev.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.bf16):
            pred = backbone.predict(model, x, t, cond)
        loss = torch.nn.functional.mse_loss(pred.float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
    return times, losses


def fixed_batches(backbone, args: argparse.Namespace, n: int = 4) -> list:
    cfg, dev = backbone.model.config, torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        x = torch.randn(args.batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
        hidden = torch.randn(args.batch, 32, cfg.cross_attention_dim, generator=g)
        t = torch.rand(args.batch, generator=g) * 1000
        out.append((x.to(dev), t.to(dev), Conditioning(hidden=hidden.to(dev)),
                    torch.randn(x.shape, generator=g).to(dev)))  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="demo", help="whose backbone (only it is built)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", type=Path, default=RESULTS / "speed_switches.json")
    args, overrides = parser.parse_known_args()
    torch.manual_seed(0)
    backbone = build(args, overrides)
    batches = fixed_batches(backbone, args)
    rows, plain = {}, None
    card = torch.cuda.get_device_name() if args.device == "cuda" else cpu_model()
    print(f"{card}; {type(backbone.model).__name__} "
          f"{sum(p.numel() for p in backbone.parameters()) / 1e6:.1f} M params, batch {args.batch}")
    print(f"{'variant':<18} {'ms/step':>8} {'speed-up':>8} {'first steps s':>13} "
          f"{'max rel loss diff':>17}")
    for name in args.variants.split(","):
        times, losses = train(backbone, batches, VARIANTS[name], args)
        step = statistics.median(times[args.warmup:])
        plain = plain or (step, losses)
        diff = max(abs(a - b) / abs(b) for a, b in zip(losses, plain[1], strict=True))
        rows[name] = {"ms_per_step": step * 1e3, "speedup": plain[0] / step,
                      "warmup_s": sum(times[:args.warmup]), "max_rel_loss_diff": diff}  # fmt: skip
        print(f"{name:<18} {step * 1e3:8.1f} {plain[0] / step:8.2f}x "
              f"{sum(times[:args.warmup]):13.1f} {diff:17.2e}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": card, "batch": args.batch, "bf16": args.bf16,
                                    "variants": rows}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
