"""Does a LoRA teach a trained model a word it never saw? Over a trained demo export, a LoRA is
trained on shards where a new colour word (default "crimson", drawn as the palette's red) names
the shapes, mixed half and half with the demo's own captions; scored by the shapes checker on
held-out combinations of the new word (shape, position, background never seen with it), before
(the base) and after (the merged export), and on the demo's own held-out captions (what the
base knew must survive).

    python benchmarks/lora_shapes.py --base outputs/runs/demo-STAMP/export \
        [--steps 400] [--lr 1e-3] [--out outputs/lora-bench]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from machine import cpu_model  # benchmarks/machine.py, beside this script

from data.shapes import ShapeSpec, all_specs, heldout_specs, render, score_many, train_specs
from data.shards import jpeg_bytes, sample_key, write_shards

DRAWN = "red"  # the palette colour the new word is drawn in (what the checker must find)


def caption(spec: ShapeSpec, word: str | None) -> str:
    """``spec``'s caption, with ``word`` instead of its colour when given."""
    text = spec.caption
    return text if word is None else f"a {word} {text[len(f'a {spec.colour} ') :]}"


def word_specs(seed: int = 0) -> tuple[list[ShapeSpec], list[ShapeSpec]]:
    """(train, held out): every shape x position x background drawn in DRAWN; a seeded fifth is
    kept out of the LoRA's data, so those combinations are new with the new word."""
    specs = [s for s in all_specs() if s.colour == DRAWN]
    order = random.Random(seed).sample(specs, len(specs))
    held = sorted(order[: len(specs) // 5], key=specs.index)
    return [s for s in specs if s not in held], held


def write_data(out: Path, word: str, num: int, size: int = 32) -> Path:
    """Half new-word samples, half the demo's own training captions, shuffled."""
    rng = np.random.default_rng(0)
    new, _ = word_specs()
    old = train_specs()
    pairs = [(new[i % len(new)], word) if i % 2 == 0 else (old[i % len(old)], None)
             for i in range(num)]  # fmt: skip
    random.Random(1).shuffle(pairs)
    samples = (
        {"__key__": sample_key(i // 500, i % 500), "jpg": jpeg_bytes(render(spec, size, rng)),
         "txt": caption(spec, w), "json": json.dumps({"width": size, "height": size})}
        for i, (spec, w) in enumerate(pairs)
    )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    write_shards(samples, str(out / "lora-%06d.tar"), 500)
    return out  # a folder of shards: data.urls takes it as is


def train(args: argparse.Namespace, urls: Path) -> tuple[Path, float]:
    overrides = [
        "experiment=lora", f"model/objective={args.objective}", f"model.base={args.base}",
        f"data.urls={urls}",
        "data.resolution=32", "data.batch_size=16", "logger=none", f"paths.root={args.out}",
        f"trainer.max_steps={args.steps}", f"model.optimizer.lr={args.lr}",
        f"model.backbone.adapter.r={args.rank}", f"model.backbone.adapter.lora_alpha={args.rank}",
        "callbacks.samples.every_n_steps=0", "trainer.val_check_interval=100000",
    ]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(["ldm-train", *overrides], check=True)
    return args.out / "runs" / "lora" / "export", time.perf_counter() - start


def score(pipe, specs: list[ShapeSpec], word: str | None, n: int, cfg: float) -> dict:
    chosen = [specs[i % len(specs)] for i in range(n)]
    generator = torch.Generator().manual_seed(0)
    images = []
    for i in range(0, n, 16):
        prompts = [caption(s, word) for s in chosen[i : i + 16]]
        images += pipe(prompts, num_inference_steps=25, guidance_scale=cfg,
                       generator=generator).images  # fmt: skip
    return score_many(images, chosen)


def main() -> None:
    from diffusers import DiffusionPipeline

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", type=Path, required=True, help="a trained demo export")
    p.add_argument("--word", default="crimson", help="the new colour word (never in the demo)")
    p.add_argument(
        "--objective",
        default="flow_pretrained",
        help="the base's (the demo trains by rectified flow; ddpm_pretrained else)",
    )
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--num-samples", type=int, default=4000, help="training samples to render")
    p.add_argument("--samples", type=int, default=96, help="generated per evaluation")
    p.add_argument("--cfg", type=float, default=1.5, help="guidance (the demo's)")
    p.add_argument("--out", type=Path, default=Path("outputs/lora-bench"))
    args = p.parse_args()
    urls = write_data(args.out / "data", args.word, args.num_samples)
    export, seconds = train(args, urls)
    results = {"cpu": cpu_model(), "word": args.word, "drawn_as": DRAWN, "steps": args.steps,
               "lr": args.lr, "rank": args.rank, "train_s": round(seconds)}  # fmt: skip
    _, held = word_specs()
    for name, path in (("base", args.base), ("lora", export)):
        pipe = DiffusionPipeline.from_pretrained(path, safety_checker=None)
        pipe.set_progress_bar_config(disable=True)
        results[f"{name}_new_word"] = score(pipe, held, args.word, args.samples, args.cfg)
        results[f"{name}_demo_heldout"] = score(pipe, heldout_specs(), None, args.samples,
                                                args.cfg)  # fmt: skip
        print(name, results[f"{name}_new_word"], results[f"{name}_demo_heldout"], flush=True)
    (args.out / "lora_shapes.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
