"""Loader throughput and headroom.

Reports samples/s of the training loader (read + decode + resize-crop + tokenize, in DataLoader
workers) for JPEG shards at 256 and 512 px and for ``ldm-data encode``-style latent shards, per
worker (1 worker) and with 2 workers; then the headroom for the demo: the demo loader's rate ÷
the demo model's training consumption (samples/s of forward + backward + AdamW on one batch).

    python benchmarks/loader.py [--samples 512] [--out results.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from data.datamodule import WebDatasetDataModule
from data.shards import write_demo_shards, write_shards
from train.tasks.rng import SampleRNG


def photo_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth colour fields plus grain: JPEG-compresses like a photo, unlike pure noise."""
    base = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(base).resize((width, height), Image.Resampling.BICUBIC)
    grain = rng.normal(0, 8, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(image) + grain, 0, 255).astype(np.uint8))


def jpeg_shards(out: Path, n: int, side: int, per_shard: int = 64) -> str:
    """img2dataset-like: shorter side ``side``, aspect 1-1.5, JPEG quality 90."""
    rng = np.random.default_rng(side)

    def samples():
        for i in range(n):
            long = int(side * rng.uniform(1.0, 1.5))
            w, h = (long, side) if i % 2 else (side, long)
            buf = io.BytesIO()
            photo_like(rng, w, h).save(buf, format="JPEG", quality=90)
            meta = {"width": w, "height": h, "original_width": w, "original_height": h}
            caption = f"a photo number {i} of a scene with several objects and some background"
            yield {
                "__key__": f"{i:09d}",
                "jpg": buf.getvalue(),
                "txt": caption,
                "json": json.dumps(meta),
            }

    write_shards(samples(), str(out / f"jpeg{side}-%06d.tar"), maxcount=per_shard)
    return str(out / f"jpeg{side}-*.tar")


def latent_shards(out: Path, n: int, hw: int, seq: int = 77, width: int = 768) -> str:
    """The layout ``ldm-data encode`` writes: float16 moments [8, hw, hw] and embeddings."""
    rng = np.random.default_rng(0)

    def npy(a: np.ndarray) -> bytes:
        buf = io.BytesIO()
        np.save(buf, a, allow_pickle=False)
        return buf.getvalue()

    def samples():
        for i in range(n):
            moments = rng.standard_normal((8, hw, hw)).astype(np.float16)
            emb = rng.standard_normal((seq, width)).astype(np.float16)
            yield {
                "__key__": f"{i:09d}",
                "latent.npy": npy(moments),
                "emb.npy": npy(emb),
                "txt": "a caption",
                "json": "{}",
            }

    write_shards(samples(), str(out / f"latent{hw}-%06d.tar"), maxcount=64)
    return str(out / f"latent{hw}-*.tar")


def tokenizer(max_length: int) -> Any:
    import transformers

    from train.models.conditioners.text import minilm_dir

    tok = transformers.AutoTokenizer.from_pretrained(minilm_dir())
    tok.model_max_length = max_length
    return tok


def loader_rate(dm: WebDatasetDataModule, epochs: int = 2) -> float:
    """Samples/s over ``epochs`` passes, not counting the wait for the first batch."""
    loader = dm.train_dataloader()
    samples, elapsed = 0, 0.0
    for _ in range(epochs):
        it = iter(loader)
        next(it)
        start = time.perf_counter()
        for batch in it:
            samples += len(batch["key"])
        elapsed += time.perf_counter() - start
    return samples / elapsed


def demo_training_rate(shards: str, steps: int = 20) -> tuple[float, int]:
    """Samples/s the demo model consumes (stage-1 VAE architecture, random weights)."""
    import torch
    from hydra.utils import instantiate

    from train.config.compose import compose

    cfg = compose(
        [
            f"data.urls={shards}",
            "experiment=demo",
            "model/vae=tiny",
            "~model.vae.pretrained_model_name_or_path",
            "logger=none",
        ]
    )
    module = instantiate(cfg.model)
    batch = next(iter(instantiate(cfg.data).train_dataloader()))
    opt = torch.optim.AdamW(module.trainable.parameters(), lr=1e-4)
    module.train()

    def step() -> None:
        loss = module.diffusion_step(batch, SampleRNG.for_rows(0, 0, 0, len(batch["key"]), "cpu"))
        loss.backward()
        opt.step()
        opt.zero_grad()

    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * len(batch["key"]) / (time.perf_counter() - start), len(batch["key"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results: dict[str, Any] = {"cpu_count": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tok = tokenizer(77)
        for side, n in ((256, args.samples), (512, args.samples // 2)):
            urls = jpeg_shards(root, n, side)
            for workers in (1, 2):
                dm = WebDatasetDataModule(
                    urls,
                    tokenizer=tok,
                    resolution=side,
                    batch_size=16,
                    num_workers=workers,
                    shuffle_buffer=64,
                )
                results[f"jpeg_{side}px_{workers}w"] = loader_rate(dm)
                print(f"jpeg_{side}px_{workers}w", results[f"jpeg_{side}px_{workers}w"], flush=True)
        urls = latent_shards(root, args.samples, 32)  # 256 px through an 8x VAE
        for workers in (1, 2):
            dm = WebDatasetDataModule(
                urls,
                resolution=256,
                batch_size=16,
                num_workers=workers,
                shuffle_buffer=64,
                latents=True,
            )
            results[f"latent_32x32_{workers}w"] = loader_rate(dm)
        demo = root / "demo"
        write_demo_shards(demo, num_samples=2000, samples_per_shard=500, size=64)
        dm = WebDatasetDataModule(
            str(demo),
            tokenizer=tokenizer(24),
            resolution=32,
            batch_size=32,
            num_workers=1,
            shuffle_buffer=500,
        )
        results["demo_loader_1w"] = loader_rate(dm)
        rate, bs = demo_training_rate(str(demo))
        results["demo_training_consumption"] = rate
        results["demo_headroom"] = results["demo_loader_1w"] / rate
    print(f"{'case':<28} {'samples/s':>10}")
    for key, value in results.items():
        print(f"{key:<28} {value:>10.1f}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
