"""Does an inpainting model fill a masked box with the prompted shape and keep the rest? Trained
(experiment=inpaint, random masks) over a trained demo export; scored on the held-out captions,
96 samples.

Training data: the demo's captions, each image with a second shape that the caption does not
name (another colour, kind and position, drawn over the same background). On the demo's own
shards the caption describes the whole image, so a model can ignore the kept pixels and still
fit the data (measured: unmasked error 16.5 of 255 after 1200 steps, 16.0 after 10);
here the kept pixels are the only source of the second shape.

Each sample: the mask is a box (0.44 of the image side) around the caption's position, the
prompt the caption; the input holds another shape (another colour and kind) in the opposite
corner for a corner caption, nothing for a centre one. Scored: the shapes checker on the box
(the prompted colour and kind), and the mean absolute error outside the mask against the input
(0-255): the other shape must survive; and how much that error exceeds the VAE's own round trip
of the same input (`vae_round_trip`; the demo's VAE never saw an empty canvas and redraws a
plain one far off, so the floor differs per sample). The base export through diffusers'
inpainting pipeline (a 4-channel UNet: latents blended outside the mask) is the baseline.

    python benchmarks/inpaint_shapes.py --base outputs/runs/demo-STAMP/export \
        [--masks random|object] [--masked-loss] [--steps 1200] [--lr 3e-4] [--out DIR]
        [--inpaint EXPORT]   # score a trained inpainting export instead of training one
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from machine import cpu_model  # benchmarks/machine.py, beside this script
from PIL import Image

from data.shapes import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    ShapeSpec,
    heldout_specs,
    render,
    score_many,
)

SIZE = 32


def second_shape(spec: ShapeSpec, rng: np.random.Generator) -> ShapeSpec:
    """Another colour, kind and position on the same background."""
    pick = lambda names, not_: [n for n in names if n != not_][rng.integers(len(names) - 1)]  # noqa: E731
    return ShapeSpec(pick(list(COLOURS), spec.colour), pick(list(SHAPES), spec.shape),
                     pick(list(POSITIONS), spec.position), spec.background)  # fmt: skip


def overlay(image: Image.Image, top: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """`top`'s shape drawn over `image` (both on the same background colour)."""
    arr, up = np.asarray(image).copy(), np.asarray(top)
    shape = np.linalg.norm(up.astype(np.float64) - background, axis=-1) > 40
    arr[shape] = up[shape]
    return Image.fromarray(arr)


def object_mask(spec: ShapeSpec, rng: np.random.Generator, full: float = 0.25) -> Image.Image:
    """A box around the captioned shape (jittered: half side 0.18-0.26, centre within 0.04 of
    the position), the mask an object-inpainting data set pairs with the object's caption; a
    whole-image mask for a `full` share (the model keeps plain text-to-image)."""
    if rng.random() < full:
        return Image.new("L", (SIZE, SIZE), 255)
    cx, cy = np.asarray(POSITIONS[spec.position]) + rng.uniform(-0.04, 0.04, 2)
    half = rng.uniform(0.18, 0.26)
    ys, xs = (np.mgrid[0:SIZE, 0:SIZE] + 0.5) / SIZE
    box = (np.abs(xs - cx) < half) & (np.abs(ys - cy) < half)
    return Image.fromarray(box.astype(np.uint8) * 255)


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_two_shape_shards(out: Path, n: int, seed: int = 0, masks: bool = False) -> Path:
    """Two-shape images with the caption of one; ``masks``: with an object mask member each
    (KEY.mask.png) over the captioned shape."""
    from data.shapes import train_specs
    from data.shards import write_shards

    specs, rng = train_specs(), np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)

    def samples():
        for i in range(n):
            spec = specs[rng.integers(len(specs))]
            image = render(spec, SIZE, rng)
            other = render(second_shape(spec, rng), SIZE, rng)
            image = overlay(image, other, BACKGROUNDS[spec.background])
            sample = {"__key__": f"{i:08d}", "png": png(image), "txt": spec.caption}
            if masks:
                sample["mask.png"] = png(object_mask(spec, rng))
            yield sample

    write_shards(samples(), str(out / "two-%06d.tar"), 1000)
    return out


def train(args: argparse.Namespace) -> tuple[Path, float]:
    object_masks = args.masks == "object"
    shards = write_two_shape_shards(args.out / "data", args.samples_train, masks=object_masks)
    overrides = [*(["+data/mask=member"] if object_masks else []),
        *(["model.backbone.masked_loss=true"] if args.masked_loss else []),
        "experiment=inpaint", f"model/objective={args.objective}",
        f"model.base={args.base}", f"data.urls={shards}",
        f"data.resolution={SIZE}", "data.batch_size=16", "logger=none", f"paths.root={args.out}",
        f"trainer.max_steps={args.steps}", f"model.optimizer.lr={args.lr}",
        "callbacks.samples.every_n_steps=0", "trainer.val_check_interval=100000",
    ]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(["ldm-train", *overrides], check=True)
    return args.out / "runs" / "inpaint" / "export", time.perf_counter() - start


OPPOSITE = {
    "top left": "bottom right",
    "bottom right": "top left",
    "top right": "bottom left",
    "bottom left": "top right",
}
HALF = 0.22  # the mask box's half side, as a fraction of the image


def case(spec: ShapeSpec, rng: np.random.Generator) -> tuple[Image.Image, np.ndarray]:
    """The input and the box mask [H, W] bool around the caption's position. A corner caption's
    input holds another shape (another colour and kind) in the opposite corner, which must
    survive; a centre caption's is an empty canvas."""
    if spec.position in OPPOSITE:
        colour = next(c for c in COLOURS if c != spec.colour)
        shape = next(k for k in SHAPES if k != spec.shape)
        other = ShapeSpec(colour, shape, OPPOSITE[spec.position], spec.background)
        canvas = render(other, SIZE, rng)
    else:
        canvas = Image.new("RGB", (SIZE, SIZE), BACKGROUNDS[spec.background])
    cx, cy = POSITIONS[spec.position]
    ys, xs = (np.mgrid[0:SIZE, 0:SIZE] + 0.5) / SIZE
    return canvas, (np.abs(xs - cx) < HALF) & (np.abs(ys - cy) < HALF)


def in_box(image: Image.Image, mask: np.ndarray) -> Image.Image:
    """The mask's bounding box of `image`: where the prompted shape must be."""
    ys, xs = np.nonzero(mask)
    return image.crop((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))


def score(pipe, n: int, cfg: float) -> dict[str, float]:
    specs = heldout_specs()
    chosen = [specs[i % len(specs)] for i in range(n)]
    rng = np.random.default_rng(123)
    cases = [case(s, rng) for s in chosen]
    generator = torch.Generator().manual_seed(0)
    images = []
    for i in range(0, n, 16):
        part = cases[i : i + 16]
        images += pipe([s.caption for s in chosen[i : i + 16]], image=[c for c, _ in part],
                       mask_image=[Image.fromarray(m.astype(np.uint8) * 255) for _, m in part],
                       num_inference_steps=25, guidance_scale=cfg, generator=generator,
                       height=SIZE, width=SIZE).images  # fmt: skip
    # In the box, the shape sits at the crop's centre: score colour and kind there.
    crops = [in_box(img, m) for img, (_, m) in zip(images, cases, strict=True)]
    centred = [ShapeSpec(s.colour, s.shape, "center", s.background) for s in chosen]
    checker = score_many(crops, centred)
    return {
        "colour": checker["colour"],
        "shape": checker["shape"],
        **unmasked_errors(images, cases),
    }


def unmasked_errors(images: list, cases: list) -> dict[str, float]:
    """Mean absolute error (0-255) against the input outside the mask, and beyond MARGIN of it;
    the mean over samples and the worst sample (``per_sample``: the first, for `excess`)."""
    near, far = [], []
    for image, (canvas, mask) in zip(images, cases, strict=True):
        err = np.abs(np.asarray(image, np.float64) - np.asarray(canvas, np.float64))
        near.append(err[~mask].mean())
        far.append(err[~dilated(mask)].mean())
    return {"unmasked_mae": float(np.mean(near)), "unmasked_mae_max": float(np.max(near)),
            f"unmasked_mae_beyond_{MARGIN}px": float(np.mean(far)),
            f"unmasked_mae_beyond_{MARGIN}px_max": float(np.max(far)),
            "per_sample": [round(float(e), 3) for e in near]}  # fmt: skip


def excess(model: dict, floor: dict) -> dict[str, float]:
    """How much the unmasked error exceeds the VAE's own round trip of the same input, per
    sample: what the model adds to the error no latent model can avoid."""
    diff = np.asarray(model["per_sample"]) - np.asarray(floor["per_sample"])
    return {"mean": float(diff.mean()), "max": float(diff.max()),
            "p90": float(np.percentile(diff, 90))}  # fmt: skip


MARGIN = 4  # px: two latent cells of the demo's VAE (factor 2), the decoder's reach past a cell


def dilated(mask: np.ndarray, margin: int = MARGIN) -> np.ndarray:
    """`mask` grown by `margin` pixels on every side (a box stays a box)."""
    ys, xs = np.nonzero(mask)
    out = np.zeros_like(mask)
    out[max(ys.min() - margin, 0) : ys.max() + margin + 1,
        max(xs.min() - margin, 0) : xs.max() + margin + 1] = True  # fmt: skip
    return out


def vae_floor(vae, n: int) -> dict[str, float]:
    """The error outside the mask (and beyond MARGIN) of the inputs' own VAE round trip: what a
    perfect inpainting model, whose latents outside the mask are the input's, still shows."""
    specs = heldout_specs()
    rng = np.random.default_rng(123)
    cases = [case(specs[i % len(specs)], rng) for i in range(n)]
    x = torch.stack([torch.from_numpy(np.asarray(c, np.float32) / 127.5 - 1).permute(2, 0, 1)
                     for c, _ in cases])  # fmt: skip
    with torch.no_grad():
        y = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    y = ((y + 1) * 127.5).round().permute(0, 2, 3, 1).numpy().astype(np.uint8)
    return unmasked_errors(list(y), cases)


def main() -> None:
    from diffusers import AutoPipelineForInpainting, DDIMScheduler, DiffusionPipeline

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", type=Path, required=True, help="a trained demo export")
    p.add_argument("--samples-train", type=int, default=4000, help="two-shape images to train on")
    p.add_argument(
        "--objective",
        default="flow_pretrained",
        help="the base's (the demo trains by rectified flow; ddpm_pretrained else)",
    )
    p.add_argument("--masks", choices=("random", "object"), default="random",
                   help="random: the preset's boxes, strokes and whole images; object: a "
                   "box over the captioned shape (a shard member), a whole image for a "
                   "quarter")  # fmt: skip
    p.add_argument("--masked-loss", action="store_true", help="model.backbone.masked_loss=true")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--samples", type=int, default=96)
    p.add_argument("--cfg", type=float, default=1.5, help="guidance (the demo's; 4 for DDPM)")
    p.add_argument("--out", type=Path, default=Path("outputs/inpaint-bench"))
    p.add_argument("--inpaint", type=Path, help="score this inpainting export (no training)")
    args = p.parse_args()
    export, seconds = (args.inpaint, 0.0) if args.inpaint else train(args)
    results = {"cpu": cpu_model(), "objective": args.objective, "cfg": args.cfg}
    if args.inpaint:  # trained elsewhere: its settings are that run's
        results["inpaint_export"] = str(args.inpaint)
    else:
        results.update(masks=args.masks, masked_loss=args.masked_loss, steps=args.steps,
                       lr=args.lr, train_s=round(seconds))  # fmt: skip
    for name, path in (("inpaint", export), ("base", args.base)):
        pipe = AutoPipelineForInpainting.from_pipe(
            DiffusionPipeline.from_pretrained(path, safety_checker=None)
        )
        if args.objective == "ddpm_pretrained":  # a flow base samples with its own scheduler
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        results[name] = score(pipe, args.samples, args.cfg)
        print(name, {k: v for k, v in results[name].items() if k != "per_sample"}, flush=True)
    floor = results["vae_round_trip"] = vae_floor(pipe.vae, args.samples)
    for name in ("inpaint", "base"):
        results[name]["unmasked_excess_over_vae"] = excess(results[name], floor)
    for part in (results["inpaint"], results["base"], floor):
        part.pop("per_sample")
    (args.out / "inpaint_shapes.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
