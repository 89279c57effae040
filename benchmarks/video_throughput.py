"""Training frames/s per device of a video denoiser, and the peak memory of each micro-batch,
over frame counts, resolutions and micro-batch sizes: the figures `batch.max_pixels_per_device`
is set from.

    python benchmarks/video_throughput.py [--experiment wan_tiny] [--frames 5,9,17]
        [--sizes 32,64] [--batch 1,2,4] [--steps 5] [--budget-mib 1024]
    python benchmarks/video_throughput.py --experiment motion_tiny --frames 8,16 --sizes 16,32
    python benchmarks/video_throughput.py --device cuda --bf16 --experiment wan_tiny \
        model/backbone=wan ...     # trailing overrides go to the config, as for ldm-train

One step is what `ldm-train` runs from precomputed latents (`data.latents=true`, the hot path):
the backbone's forward on noised clip latents [B, C, F', h, w] (F' and h, w from the
experiment's VAE: 1 + (F - 1) / 4 and H / 8 for Wan's, F and H / 4 for the tiny per-frame VAE),
MSE loss, backward, AdamW step. Latents and text states are random: speed and memory do not
depend on their values. Each point runs in a fresh process, so its peak (resident memory on a
CPU, CUDA's max allocated on a GPU) is its own. Frames/s counts the clip's frames (F, not F'),
the figure video trainers quote. Prints a table and the largest frame-pixel count per
micro-batch that stayed within ``--budget-mib``; writes benchmarks/results/video_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path

from machine import cpu_model, step_times  # benchmarks/ is the script's folder, on sys.path

RESULTS = Path(__file__).parent / "results"


def build(experiment: str, frames: int, size: int, overrides: list[str]):
    """The experiment's backbone and the latent shape [C, F', h, w] its VAE gives a clip."""
    from hydra.utils import instantiate

    from train.config.compose import compose
    from train.models.parts import vae_scale_factor, vae_temporal_factor

    cfg = compose([f"experiment={experiment}", f"data.resolution={size}",
                   f"data.video.num_frames={frames}", *overrides])  # fmt: skip
    vae = instantiate(cfg.model.vae)
    backbone = instantiate(cfg.model.backbone)
    temporal, spatial = vae_temporal_factor(vae), vae_scale_factor(vae)
    latent = (backbone.latent_channels, 1 + (frames - 1) // temporal if temporal > 1 else frames,
              size // spatial, size // spatial)  # fmt: skip
    return backbone, latent


def text_dim(backbone) -> int:
    cfg = backbone.model.config
    return int(cfg.get("text_dim") or cfg.get("cross_attention_dim"))


def child(args: argparse.Namespace, overrides: list[str]) -> None:
    """One (frames, size, batch) point: prints a JSON line."""
    import psutil
    import torch

    from train.models.conditioning import Conditioning

    torch.manual_seed(0)
    dev = torch.device(args.device)
    backbone, latent = build(args.experiment, args.frames[0], args.sizes[0], overrides)
    backbone = backbone.to(dev)
    batch = args.batch[0]
    x = torch.randn(batch, *latent, device=dev)
    target = torch.randn_like(x)
    cond = Conditioning(hidden=torch.randn(batch, 77, text_dim(backbone), device=dev))
    t = torch.rand(batch, device=dev) * 1000
    params = [p for p in backbone.parameters() if p.requires_grad]
    # The model and inputs before a step; the peak above it is gradients, optimizer state and
    # activations, what the micro-batch decides.
    held = (torch.cuda.memory_allocated() if dev.type == "cuda"
            else psutil.Process().memory_info().rss) / 2**20  # fmt: skip
    opt = torch.optim.AdamW(params, lr=1e-5, fused=dev.type == "cuda")
    dtype = torch.bfloat16 if args.bf16 else torch.float32

    def step() -> None:
        with torch.autocast(dev.type, dtype=dtype, enabled=args.bf16):
            pred = backbone(x, t, cond)
        torch.nn.functional.mse_loss(pred.float(), target).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = step_times(step, dev.type, args.warmup, args.steps)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    step_s = statistics.median(times)
    print(json.dumps({"latent": list(latent), "step_s": step_s, "peak_mib": peak,
                      "held_mib": held,
                      "frames_per_s": batch * args.frames[0] / step_s,
                      "params": sum(p.numel() for p in params)}))  # fmt: skip


def point(args: argparse.Namespace, overrides: list[str], frames: int, size: int, batch: int):
    cmd = [sys.executable, __file__, "--child", "--experiment", args.experiment, "--frames",
           str(frames), "--sizes", str(size), "--batch", str(batch), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--device", args.device,
           *(["--bf16"] if args.bf16 else []), *overrides]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise SystemExit(f"{frames} frames at {size} px, batch {batch} failed:\n{proc.stderr}")
    return {"frames": frames, "size": size, "batch": batch,
            "frame_pixels": batch * frames * size * size, **json.loads(lines[-1])}  # fmt: skip


def device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    return cpu_model()


def report(rows: list[dict], budget_mib: float) -> int | None:
    print(f"{'frames':>6} {'px':>4} {'batch':>5} {'latent [C,F,h,w]':>17} {'frame px':>10} "
          f"{'step s':>8} {'frames/s':>9} {'peak MiB':>9} {'above held':>10}")  # fmt: skip
    for r in rows:
        print(f"{r['frames']:>6} {r['size']:>4} {r['batch']:>5} {str(r['latent']):>17} "
              f"{r['frame_pixels']:>10,} {r['step_s']:>8.3f} {r['frames_per_s']:>9.1f} "
              f"{r['peak_mib']:>9.1f} {r['peak_mib'] - r['held_mib']:>10.1f}")  # fmt: skip
    fits = [r["frame_pixels"] for r in rows if r["peak_mib"] <= budget_mib]
    return max(fits, default=None)


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="wan_tiny")
    parser.add_argument("--frames", type=ints, default=[5, 9, 17])
    parser.add_argument("--sizes", type=ints, default=[32, 64])
    parser.add_argument("--batch", type=ints, default=[1, 4])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast, fp32 weights")
    parser.add_argument("--budget-mib", type=float, default=1024)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args()
    if args.child:
        return child(args, overrides)
    rows = [point(args, overrides, f, s, b)
            for f in args.frames for s in args.sizes for b in args.batch]  # fmt: skip
    device = device_name(args.device)
    print(f"{args.experiment} {' '.join(overrides)} on {device} ({args.device}"
          f"{', bf16' if args.bf16 else ''}), {rows[0]['params']:,} trained parameters")
    best = report(rows, args.budget_mib)
    print(f"largest micro-batch within {args.budget_mib:g} MiB: "
          + (f"{best:,} frame pixels (batch.max_pixels_per_device={best})" if best else "none"))
    RESULTS.mkdir(exist_ok=True)
    out = {"experiment": args.experiment, "overrides": overrides, "device": device,
           "bf16": args.bf16, "budget_mib": args.budget_mib, "max_pixels_within": best,
           "rows": rows}  # fmt: skip
    (RESULTS / "video_throughput.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
