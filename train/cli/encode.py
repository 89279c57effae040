"""``ldm-data encode OUT [overrides]``: precompute latents and text embeddings into new shards.

The frozen VAE and text encoder, resolution, captions, buckets and filters come from the same
Hydra config ``ldm-train`` composes (the overrides are ``ldm-train``'s), so the encoded shards
hold exactly what online training would compute. Every output shard keeps its input's name and
samples (``KEY.latent.npy`` = VAE posterior mean and log-variance [2C, h, w], or a clip's
[2C, F', h, w], ``KEY.emb.npy`` = text hidden states [L, D], ``KEY.txt``, ``KEY.json``). A
video's clip is its first ``data.video.num_frames`` frames at ``data.video.fps``, encoded once
(as an image's crop is). A shard is streamed to a temporary name
and renamed when complete, so a rerun skips finished shards and redoes the interrupted one.
Train from them with ``data.urls=OUT data.latents=true``.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from train.models.parts import posterior_of

log = logging.getLogger(__name__)
DTYPES = {"float16": np.float16, "float32": np.float32}


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def micro_sizes(sample: dict[str, Any]) -> np.ndarray:
    """SDXL's micro-conditioning of a decoded sample (original h, w; crop top, left; target h,
    w) as int64 [6]: the crop happened at encode time, so only these numbers remember it."""
    keys = ("original_size", "crop_top_left", "target_size")
    return np.concatenate([np.asarray(sample[k], dtype=np.int64).reshape(2) for k in keys])


class ShardEncoder:
    """Encodes whole shards with a frozen VAE and text encoder."""

    def __init__(
        self, vae: Any, conditioner: Any, decoder: Any, batch_size: int, dtype: str, device: str
    ) -> None:
        if not vae.config.get("_name_or_path"):
            # A random-init VAE (model/vae=tiny) differs in every process: its latents would
            # not match the VAE that training and export use.
            raise ValueError(
                "model.vae is randomly initialised; encode with a trained one: "
                "model/vae=pretrained model.vae.pretrained_model_name_or_path=DIR"
            )
        random_text = [name for name, part in conditioner.pipeline_parts().items()
                       if isinstance(part, torch.nn.Module) and not part.name_or_path]  # fmt: skip
        if random_text:
            # Likewise for text encoders built from config (the tiny SDXL/SD3/Flux ones).
            raise ValueError(
                f"model.conditioner's {', '.join(random_text)} is randomly initialised; encode "
                "with pretrained text encoders (a conditioner config with from_pretrained)"
            )
        self.vae = vae.to(device).eval()
        self.conditioner = conditioner.to(device).eval()
        self.decoder, self.batch_size = decoder, batch_size
        self.dtype, self.device = DTYPES[dtype], torch.device(device)

    @torch.no_grad()
    def _encode(self, samples: list[dict[str, Any]]) -> list[dict[str, bytes]]:
        # One forward per shape: batches of mixed aspect buckets cannot be stacked.
        out: list[dict[str, bytes]] = [{} for _ in samples]
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i, s in enumerate(samples):
            by_size.setdefault(tuple(s["pixel_values"].shape), []).append(i)
        for idx in by_size.values():
            pixels = torch.stack([samples[i]["pixel_values"] for i in idx]).to(self.device)
            # Images [B, 2C, h, w]; clips [B, 2C, F', h, w] (whole by a video VAE, else per frame)
            moments = posterior_of(self.vae, pixels.to(self.vae.dtype)).parameters
            cond = self.conditioner.encode({"caption": [samples[i]["caption"] for i in idx]}, None)
            members = {"emb.npy": cond.hidden, "pooled.npy": cond.pooled, "emb_mask.npy": cond.mask}
            for j, i in enumerate(idx):
                out[i]["latent.npy"] = _npy(moments[j].float().cpu().numpy().astype(self.dtype))
                out[i]["sizes.npy"] = _npy(micro_sizes(samples[i]))
                for name, value in members.items():
                    if value is not None:
                        out[i][name] = _npy(value[j].float().cpu().numpy().astype(self.dtype))
        return out

    def encode_shard(self, url: str, dest: Path) -> int:
        """Encode one shard into ``dest`` (written as ``.dest.tmp`` then renamed)."""
        import webdataset as wds

        from data.sources import iter_raw_samples

        tmp = dest.with_name(f".{dest.name}.tmp")
        written = 0
        with wds.TarWriter(str(tmp), encoder=False, mtime=0.0) as sink:
            pending: list[tuple[dict[str, Any], dict[str, Any]]] = []
            for raw in iter_raw_samples(url, self.decoder.counter.tar_handler):
                sample = self.decoder(raw, _sample_rng(raw))
                if sample is not None:
                    pending.append((raw, sample))
                if len(pending) >= self.batch_size:
                    written += self._flush(pending, sink)
            written += self._flush(pending, sink)
        os.replace(tmp, dest)
        return written

    def _flush(self, pending: list[tuple[dict[str, Any], dict[str, Any]]], sink: Any) -> int:
        if not pending:
            return 0
        encoded = self._encode([s for _, s in pending])
        for (raw, sample), members in zip(pending, encoded, strict=True):
            meta = _json(raw) | {
                "original_size": sample["original_size"].tolist(),
                "crop_top_left": sample["crop_top_left"].tolist(),
                "target_size": sample["target_size"].tolist(),
            }
            if "fps" in sample:  # a clip: its frames' rate, and how many were encoded
                meta |= {"clip_fps": float(sample["fps"]),
                         "clip_frames": int(sample["pixel_values"].shape[1])}  # fmt: skip
            sink.write(
                {
                    "__key__": sample["key"],
                    **members,
                    "txt": sample["caption"].encode("utf-8"),
                    "json": json.dumps(meta).encode("utf-8"),
                }
            )
        n = len(pending)
        pending.clear()
        return n


def _sample_rng(raw: dict[str, Any]) -> Any:
    import random

    # Caption choice among several fields is seeded by the key: reruns write the same shards.
    return random.Random(f"encode/{raw.get('__key__')}")


def _json(raw: dict[str, Any]) -> dict[str, Any]:
    from data.metadata import sample_json

    return dict(sample_json(raw))


def _worker(job: tuple[Any, list[str], str, int, str, int, int]) -> dict[str, int]:
    cfg, shards, out, batch_size, dtype, index, workers = job
    from hydra.utils import instantiate

    from data.transforms import SkipCounter

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    device = f"cuda:{index % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"
    datamodule = instantiate(cfg.data, latents=False)
    counter = SkipCounter(datamodule.max_skip_fraction, "encode")
    vae = instantiate(cfg.model.vae)
    if cfg.model.get("vae_tiling") is not None:
        instantiate(cfg.model.vae_tiling).apply(vae)
    encoder = ShardEncoder(
        vae,
        instantiate(cfg.model.conditioner),
        datamodule.decoder(counter, train=False),
        batch_size,
        dtype,
        device,
    )
    counts = {}
    for url in shards:
        dest = Path(out) / Path(url).name
        if dest.exists():
            continue
        counts[dest.name] = encoder.encode_shard(url, dest)
        log.info("encoded %s: %d samples", url, counts[dest.name])
    return counts


def encode(cfg: Any, out: Path, workers: int, batch_size: int, dtype: str) -> dict[str, int]:
    """Encode every shard of ``cfg.data``; returns sample counts per output shard."""
    from data.folder import update_sizes_file
    from data.sources import ShardSizes, resolve_shards

    shards = resolve_shards(cfg.data.urls)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [
        (cfg, shards[i::workers], str(out), batch_size, dtype, i, workers) for i in range(workers)
    ]
    if workers == 1:
        results = [_worker(job) for job in jobs]
    else:
        import torch.multiprocessing as mp

        # spawn: each process builds its own models (fork after torch threads start can hang).
        with mp.get_context("spawn").Pool(workers) as pool:
            results = pool.map(_worker, jobs)
    written = {name: n for counts in results for name, n in counts.items()}
    # Only shards finished by an earlier run need counting (sizes.json or their tar headers):
    # re-reading the tars just written costs seconds on every first run.
    names = [Path(u).name for u in shards]
    earlier = [n for n in names if n not in written]
    written.update(zip(earlier, ShardSizes()([str(out / n) for n in earlier]), strict=True))
    sizes = {n: written[n] for n in names}
    update_sizes_file(out, sizes)
    return sizes


def run_cli(args: argparse.Namespace) -> int:
    from train.config.compose import compose

    cfg = compose(args.overrides)
    sizes = encode(cfg, Path(args.out), args.workers, args.batch_size, args.dtype)
    print(f"encoded {sum(sizes.values())} samples in {len(sizes)} shards into {args.out}")
    print(f"train with: ldm-train ... data.urls={args.out} data.latents=true")
    return 0
