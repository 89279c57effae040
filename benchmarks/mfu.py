"""Model FLOPs utilisation of one GPU training the SD-2-size UNet at 256 px in bf16.

    python benchmarks/mfu.py [--batch 64] [--steps 30] [--compile] [--channels-last]
    python benchmarks/mfu.py --tiny --device cpu     # a seconds-long smoke run of the script

One training step as `ldm-train` runs it from precomputed latents (`data.latents=true`): UNet
forward under bf16 autocast with float32 master weights (Lightning's bf16-mixed), MSE loss,
backward, fused AdamW step. Latents [B, 4, 32, 32] and text states [B, 77, 1024] are random:
MFU does not depend on their values. FLOPs per step are counted once with PyTorch's FLOP
counter (`train.models.flops`); the peak is Lightning's table for the card (bf16 dense). Prints the
card, step time, samples/s and MFU; writes benchmarks/results/mfu.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from hydra.utils import instantiate
from lightning.fabric.utilities.throughput import get_available_flops
from machine import step_times  # benchmarks/ is the script's folder, on sys.path
from omegaconf import OmegaConf

from train.models.conditioning import Conditioning
from train.models.flops import train_flops

CONF = Path(__file__).resolve().parent.parent / "conf" / "model" / "backbone"
RESULTS = Path(__file__).parent / "results"


def build(args: argparse.Namespace):
    """The backbone `model/backbone=unet_sd2` (or `unet_tiny`) builds, as training does."""
    cfg = OmegaConf.load(CONF / ("unet_tiny.yaml" if args.tiny else "unet_sd2.yaml"))
    backbone = instantiate(cfg)
    backbone.model.to(args.device)
    if args.channels_last:
        backbone.model.to(memory_format=torch.channels_last)
    return backbone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny UNet (smoke test)")
    parser.add_argument("--out", type=Path, default=RESULTS / "mfu.json")
    args = parser.parse_args()

    backbone = build(args)
    unet = backbone.model
    latent = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    context = (77, unet.config.cross_attention_dim)
    flops = train_flops(backbone, args.batch, latent, Conditioning(torch.empty(1, *context)))
    model = torch.compile(unet) if args.compile else unet
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-5, fused=args.device == "cuda")
    dev = torch.device(args.device)
    x = torch.randn(args.batch, *latent, device=dev)
    ctx = torch.randn(args.batch, *context, device=dev)
    t = torch.randint(0, 1000, (args.batch,), device=dev)
    target = torch.randn_like(x)

    def step() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            pred = model(x, t, encoder_hidden_states=ctx).sample
        loss = torch.nn.functional.mse_loss(pred.float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = step_times(step, dev.type, args.warmup, args.steps)

    step_s = statistics.median(times)
    peak = get_available_flops(dev, torch.bfloat16)
    card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    result = {
        "card": card,
        "unet_params_m": sum(p.numel() for p in unet.parameters()) / 1e6,
        "batch": args.batch,
        "latent": list(latent),
        "compile": args.compile,
        "channels_last": args.channels_last,
        "median_step_s": step_s,
        "samples_per_s": args.batch / step_s,
        "tflops_per_s": flops / step_s / 1e12,
        "peak_tflops": peak / 1e12 if peak else None,
        "mfu": flops / step_s / peak if peak else None,
    }
    mfu = f"{result['mfu']:.1%}" if peak else "n/a (no peak for this device)"
    print(
        f"{card}: {result['unet_params_m']:.0f} M params, batch {args.batch}, "
        f"step {step_s * 1e3:.1f} ms, {result['samples_per_s']:.1f} samples/s, "
        f"{result['tflops_per_s']:.1f} TFLOP/s, MFU {mfu}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
