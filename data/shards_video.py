"""The moving-shapes demo set as video shards in video2dataset's layout: ``KEY.mp4`` (H.264),
``KEY.txt``, ``KEY.json``, plus ``heldout.json`` and ``manifest.json`` as the image demo has."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from data.shapes_video import MotionSpec, heldout_motion_specs, render_clip, train_motion_specs
from data.shards import balanced, sample_key, shard_pattern, write_set_files, write_shards

VIDEO_PREFIX = "moving-shapes-"


def encode_mp4(frames: Sequence[Image.Image], fps: int, pix_fmt: str = "yuv444p") -> bytes:
    """H.264 in MP4 at a low CRF, at full chroma by default (yuv444p): 4:2:0 would bleed a 32 px
    shape's colour into the background, as 4:2:0 JPEG does in the image demo. Browsers play
    yuv420p only (even sizes)."""
    import av

    buf = io.BytesIO()
    w, h = frames[0].size
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=Fraction(fps), options={"crf": "10"})
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        for frame in frames:
            out.mux(stream.encode(av.VideoFrame.from_image(frame.convert("RGB"))))
        out.mux(stream.encode())
    return buf.getvalue()


def _samples(
    specs: list[MotionSpec], num_samples: int, per_shard: int, clip: tuple[int, int, int], seed: int
) -> Iterator[dict[str, Any]]:
    size, frames, fps = clip
    rng = np.random.default_rng(seed)
    for i, spec in enumerate(balanced(specs, num_samples, rng)):
        meta = {"caption": spec.caption, "width": size, "height": size, "frames": frames,
                "fps": fps, "duration": frames / fps, "colour": spec.colour, "shape": spec.shape,
                "direction": spec.direction, "background": spec.background}  # fmt: skip
        yield {
            "__key__": sample_key(i // per_shard, i % per_shard),
            "mp4": encode_mp4(render_clip(spec, size, frames, rng), fps),
            "txt": spec.caption,
            "json": json.dumps(meta, sort_keys=True),
        }


def write_motion_demo_shards(
    out_dir: str | Path,
    num_samples: int = 2000,
    samples_per_shard: int = 500,
    size: int = 32,
    frames: int = 9,
    fps: int = 8,
    seed: int = 0,
    heldout_seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Render the training combinations into ``out_dir``; returns the manifest (written last)."""
    if num_samples <= 0 or samples_per_shard <= 0 or frames < 1 or fps < 1:
        raise ValueError("num_samples, samples_per_shard, frames and fps must be positive")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specs = train_motion_specs(heldout_seed)
    samples = _samples(specs, num_samples, samples_per_shard, (size, frames, fps), seed)
    if progress:
        samples = tqdm(samples, total=num_samples, desc="rendering", unit="clip")
    files = write_shards(samples, str(out / f"{VIDEO_PREFIX}%06d.tar"), samples_per_shard)
    held = [s.caption for s in heldout_motion_specs(heldout_seed)]
    manifest = {"num_samples": num_samples, "samples_per_shard": samples_per_shard,
                "num_shards": len(files), "size": size, "frames": frames, "fps": fps,
                "seed": seed, "heldout_seed": heldout_seed, "num_train_specs": len(specs),
                "num_heldout_specs": len(held), "shards": [Path(f).name for f in files],
                "pattern": Path(shard_pattern(out, len(files), VIDEO_PREFIX)).name}  # fmt: skip
    write_set_files(out, held, manifest)
    return manifest
