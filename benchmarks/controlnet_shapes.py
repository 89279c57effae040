"""Does a ControlNet learn its control? Trained on the shapes demo's shards with each shape's
mask as the control, over a trained demo export; scored on the held-out captions by the IoU of
the generated shape's mask with the control mask.

Two evaluations, 96 samples each, fresh renders never seen in training:
- `matching`: the control is the mask of the captioned shape (held-out caption combinations);
- `moved`: the control is the same shape's mask at another position than the caption names, so
  the IoU says whether the control or the text decides where the shape goes.
The base pipeline (no ControlNet) is scored against the same masks as the baseline.

    python benchmarks/controlnet_shapes.py --base outputs/runs/demo-STAMP/export \
        --shards outputs/data/shapes [--steps 1200] [--lr 1e-3] [--out outputs/controlnet-bench]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from machine import cpu_model  # benchmarks/machine.py, beside this script

from data.controls import ForegroundMask
from data.shapes import POSITIONS, ShapeSpec, heldout_specs, render, score_many


def embedder_channels(base: Path) -> str:
    """The conditioning embedder's channels: one entry more than the VAE's 2x downsamplings."""
    blocks = json.loads((base / "vae" / "config.json").read_text())["block_out_channels"]
    return str([16 * 2**i for i in range(len(blocks))]).replace(" ", "")


def train(args: argparse.Namespace) -> tuple[Path, float]:
    overrides = [
        "experiment=controlnet", f"model/objective={args.objective}",
        f"model.base={args.base}", f"data.urls={args.shards}",
        "data/control=mask", "data.resolution=32", "data.batch_size=16", "logger=none",
        f"paths.root={args.out}", f"trainer.max_steps={args.steps}",
        f"model.optimizer.lr={args.lr}",
        f"model.backbone.conditioning_embedding_out_channels={embedder_channels(args.base)}",
        "callbacks.samples.every_n_steps=0", "trainer.val_check_interval=100000",
    ]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(["ldm-train", *overrides], check=True)
    return args.out / "runs" / "controlnet" / "export", time.perf_counter() - start


def mask_of(image) -> np.ndarray:
    """[H, W] bool: the foreground, as the training control was computed."""
    return np.asarray(ForegroundMask()(None, image.convert("RGB"), image.size, None))[..., 0] > 127


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def controls(n: int, moved: bool, seed: int = 123) -> tuple[list[ShapeSpec], list]:
    """The captions' specs and control images (rendered at 32 px with their own jitter); moved:
    the control's shape sits at the next position in POSITIONS instead of the captioned one."""
    specs = heldout_specs()
    chosen = [specs[i % len(specs)] for i in range(n)]
    names = list(POSITIONS)
    rng = np.random.default_rng(seed)
    images = []
    for spec in chosen:
        where = names[(names.index(spec.position) + 1) % len(names)] if moved else spec.position
        drawn = ShapeSpec(spec.colour, spec.shape, where, spec.background)
        images.append(ForegroundMask()(None, render(drawn, 32, rng), (32, 32), None))
    return chosen, images


def score(pipe, n: int, moved: bool, control: bool, cfg: float) -> dict[str, float]:
    specs, masks = controls(n, moved)
    generator = torch.Generator().manual_seed(0)
    images = []
    for i in range(0, n, 16):
        kw = {"image": masks[i : i + 16]} if control else {}
        images += pipe([s.caption for s in specs[i : i + 16]], num_inference_steps=25,
                       guidance_scale=cfg, generator=generator, **kw).images  # fmt: skip
    ious = [iou(mask_of(img), mask_of(m)) for img, m in zip(images, masks, strict=True)]
    checker = score_many(images, specs)
    return {"mean_iou": float(np.mean(ious)), "iou_ge_0.5": float(np.mean(np.array(ious) >= 0.5)),
            "colour": checker["colour"], "shape": checker["shape"]}  # fmt: skip


def main() -> None:
    from diffusers import DDIMScheduler, DiffusionPipeline

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", type=Path, required=True, help="a trained demo export")
    p.add_argument("--shards", type=Path, required=True, help="the demo's shapes shards")
    p.add_argument(
        "--objective",
        default="flow_pretrained",
        help="the base's (the demo trains by rectified flow; ddpm_pretrained else)",
    )
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--samples", type=int, default=96)
    p.add_argument("--cfg", type=float, default=1.5, help="guidance (the demo's; 4 for DDPM)")
    p.add_argument("--out", type=Path, default=Path("outputs/controlnet-bench"))
    args = p.parse_args()
    export, seconds = train(args)
    results = {"cpu": cpu_model(), "objective": args.objective, "cfg": args.cfg,
               "steps": args.steps, "lr": args.lr, "train_s": round(seconds)}  # fmt: skip
    for name, path, control in (("controlnet", export, True), ("base", args.base, False)):
        pipe = DiffusionPipeline.from_pretrained(path, safety_checker=None)
        if args.objective == "ddpm_pretrained":  # a flow base samples with its own scheduler
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        for moved in (False, True):
            key = f"{name}_{'moved' if moved else 'matching'}"
            results[key] = score(pipe, args.samples, moved, control, args.cfg)
            print(key, results[key], flush=True)
    (args.out / "controlnet_shapes.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
