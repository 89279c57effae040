"""Memory of the video VAE paths: caching clip latents streams, and tiled decode fits a budget.

``encode``: renders ``--clips`` × 10 moving-shapes clips, then runs ``ldm-data encode`` (a saved
tiny Wan VAE) over the first tenth and over all of them, each in a fresh process, and reports
the peak resident memory (process and children, sampled every 50 ms). Flat means within 5 %.

``decode``: decodes one clip's latents with Wan 2.1's VAE architecture (``AutoencoderKLWan()``,
127 M parameters, random weights: memory does not depend on them) untiled and tiled, each in a
fresh process whose address space is capped at what it holds after loading plus ``--budget-mib``
(``RLIMIT_AS``), so a decode that needs more fails there instead of swapping; reports success
and peak RSS for each.

    python benchmarks/video_memory.py encode [--clips 40 --frames 17 --size 128]
    python benchmarks/video_memory.py decode [--frames 5 --size 256 --tile 128 --budget-mib 1024]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loader_memory import peak_rss  # benchmarks/ is the script's folder, on sys.path


def encode_peaks(clips: int, frames: int, size: int, per_shard: int) -> dict[int, float]:
    """Peak RSS (MiB) of ``ldm-data encode`` over ``clips`` and over 10x ``clips``."""
    import torch
    from hydra.utils import instantiate

    from data.shards_video import write_motion_demo_shards
    from train.config.compose import compose

    peaks = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_motion_demo_shards(root / "clips", num_samples=clips * 10,
                                 samples_per_shard=per_shard, size=size, frames=frames,
                                 fps=8)  # fmt: skip
        torch.manual_seed(0)  # model/vae=wan_tiny, saved as a folder ldm-data encode loads
        vae = instantiate(compose(["experiment=wan_tiny"]).model.vae)
        vae.save_pretrained(root / "vae" / "vae")
        shards = sorted((root / "clips").glob("*.tar"))
        for count in (clips, clips * 10):
            n = count // per_shard
            urls = f"{shards[0].parent}/{shards[0].name[:-10]}{{000000..{n - 1:06d}}}.tar"
            cmd = ["ldm-data", "encode", str(root / f"out{count}"), "experiment=wan_tiny",
                   "logger=none", f"data.urls=\"{urls}\"", f"data.resolution={size}",
                   f"data.video.num_frames={frames}", "model/vae=wan",
                   f"model.vae.pretrained_model_name_or_path={root / 'vae'}",
                   "--batch-size", "4"]  # fmt: skip
            start = time.perf_counter()
            peak, out = peak_rss(cmd)
            peaks[count] = peak / 2**20
            print(f"{count:>5} clips ({n} shards)  peak RSS {peaks[count]:8.1f} MiB  "
                  f"{time.perf_counter() - start:6.1f} s  {out.strip().splitlines()[0]}")
    return peaks


def decode_child(frames: int, size: int, tile: int | None, budget_mib: int) -> None:
    """One decode under an address-space cap; prints a JSON line."""
    import psutil
    import torch
    from diffusers import AutoencoderKLWan

    from train.models.vae_tiling import VaeTiling

    torch.manual_seed(0)
    vae = AutoencoderKLWan().eval()
    if tile:
        VaeTiling(tile).apply(vae)
    latents = torch.randn(1, 16, 1 + (frames - 1) // 4, size // 8, size // 8)
    held = psutil.Process().memory_info().vms
    limit = held + budget_mib * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    start = time.perf_counter()
    try:
        with torch.no_grad():
            shape = list(vae.decode(latents).sample.shape)
        result = {"ok": True, "shape": shape}
    except (RuntimeError, MemoryError) as exn:
        result = {"ok": False, "error": str(exn).splitlines()[0][:120]}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    result |= {"seconds": time.perf_counter() - start, "peak_rss_mib": peak}
    print(json.dumps(result))


def decode_runs(frames: int, size: int, tile: int, budget_mib: int) -> dict[str, dict]:
    results = {}
    for name, t in (("untiled", 0), (f"tiled {tile} px", tile)):
        cmd = [sys.executable, __file__, "decode-child", "--frames", str(frames), "--size",
               str(size), "--tile", str(t), "--budget-mib", str(budget_mib)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        failed = {"ok": False, "error": proc.stderr[-300:]}
        r = results[name] = json.loads(lines[-1]) if lines else failed
        what = f"decoded {r['shape']}" if r["ok"] else f"FAILED: {r['error']}"
        print(f"{name:>14}: {what}  peak RSS {r.get('peak_rss_mib', 0):8.1f} MiB  "
              f"{r.get('seconds', 0):6.1f} s")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("encode", "decode", "decode-child"))
    parser.add_argument("--clips", type=int, default=40)
    parser.add_argument("--per-shard", type=int, default=20)
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--budget-mib", type=int, default=1024)
    args = parser.parse_args()
    if args.mode == "encode":
        peaks = encode_peaks(args.clips, args.frames or 17, args.size or 128, args.per_shard)
        growth = peaks[args.clips * 10] / peaks[args.clips] - 1
        print(f"peak memory growth for 10x clips: {growth:+.1%} (goal: within 5 %)")
        print(json.dumps({"peaks_mib": peaks, "growth": growth}))
    elif args.mode == "decode":
        frames, size = args.frames or 5, args.size or 256
        print(f"Wan 2.1 VAE decode of {frames} frames at {size} px, budget {args.budget_mib} MiB "
              "above the loaded model")  # fmt: skip
        print(json.dumps(decode_runs(frames, size, args.tile, args.budget_mib)))
    else:
        decode_child(args.frames, args.size, args.tile or None, args.budget_mib)


if __name__ == "__main__":
    main()
