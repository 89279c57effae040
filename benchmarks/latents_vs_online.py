"""Training speed from precomputed latents (``ldm-data encode``) vs online VAE/text encoding.

The demo model (stage-1 VAE architecture saved as a pretrained folder, MiniLM, tiny UNet) on the
demo shards: samples/s of full training steps (loader + forward + backward + AdamW) both ways,
with the same batches, and the one-off encoding cost.

    python benchmarks/latents_vs_online.py [--steps 40] [--no-text-cache]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from hydra.utils import instantiate

from data.shards import write_demo_shards
from train.cli.encode import encode
from train.config.compose import compose
from train.tasks.rng import SampleRNG


def train_rate(cfg, data_overrides: dict, steps: int) -> float:
    module = instantiate(cfg.model).train()
    opt = torch.optim.AdamW(module.trainable.parameters(), lr=1e-4)
    loader = instantiate(cfg.data, **data_overrides).train_dataloader()
    samples, start = 0, None
    for i, batch in enumerate(loader):
        if i == 3:  # after warm-up
            samples, start = 0, time.perf_counter()
        loss = module.diffusion_step(batch, SampleRNG.for_rows(0, i, 0, len(batch["key"]), "cpu"))
        loss.backward()
        opt.step()
        opt.zero_grad()
        samples += len(batch["key"])
        if i == steps + 3:
            break
    return samples / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--no-text-cache", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_demo_shards(
            root / "data" / "shapes", num_samples=2000, samples_per_shard=500, size=64
        )
        base = compose(
            [
                f"paths.root={root}",
                "experiment=demo",
                "model/vae=tiny",
                "~model.vae.pretrained_model_name_or_path",
            ]
        )
        torch.manual_seed(0)
        instantiate(base.model.vae).save_pretrained(root / "vae")
        overrides = [
            f"paths.root={root}",
            "experiment=demo",
            f"model.vae.pretrained_model_name_or_path={root / 'vae'}",
        ]
        if args.no_text_cache:
            overrides.append("model.conditioner.cache_size=0")
        cfg = compose(overrides)
        start = time.perf_counter()
        sizes = encode(cfg, root / "latents", workers=1, batch_size=64, dtype="float16")
        encode_rate = sum(sizes.values()) / (time.perf_counter() - start)
        online = train_rate(cfg, {}, args.steps)
        latents = train_rate(cfg, {"urls": str(root / "latents"), "latents": True}, args.steps)
    result = {
        "encode_samples_per_sec": encode_rate,
        "online_train_samples_per_sec": online,
        "latent_train_samples_per_sec": latents,
        "speedup": latents / online,
        "text_cache": not args.no_text_cache,
    }
    for key, value in result.items():
        print(f"{key:<32} {value:.2f}" if isinstance(value, float) else f"{key:<32} {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
