"""Peak memory of the training loader when the number of shards streamed grows 10x.

Writes ``--shards`` × 10 shards, then streams the first ``--shards`` and then all of them, each
in a fresh process (2 DataLoader workers), and reports the peak resident memory of the main
process plus its workers (sampled every 50 ms with psutil). Flat means within 5 %.

    python benchmarks/loader_memory.py [--shards 10] [--per-shard 200]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil


def stream(urls: str, workers: int) -> int:
    from data.datamodule import WebDatasetDataModule

    dm = WebDatasetDataModule(
        urls, resolution=32, batch_size=32, num_workers=workers, shuffle_buffer=1000
    )
    return sum(len(batch["key"]) for batch in dm.train_dataloader())


def peak_rss(cmd: list[str]) -> tuple[int, str]:
    """Run ``cmd``; the peak of (its RSS + its children's RSS) in bytes, and its stdout."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    parent = psutil.Process(proc.pid)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            try:
                procs = [parent, *parent.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in procs))
            except psutil.Error:
                pass
            time.sleep(0.05)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, _ = proc.communicate()
    done.set()
    thread.join()
    if proc.returncode:
        raise RuntimeError(f"{cmd} failed with {proc.returncode}")
    return peak, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shards", type=int, default=10)
    parser.add_argument("--per-shard", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--stream", help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args()
    if args.stream:
        print(stream(args.stream, args.workers))
        return
    from data.shards import write_demo_shards

    with tempfile.TemporaryDirectory() as tmp:
        n = args.shards * 10
        write_demo_shards(
            Path(tmp), num_samples=n * args.per_shard, samples_per_shard=args.per_shard, size=64
        )
        results = {}
        for count in (args.shards, n):
            urls = f"{tmp}/shapes-{{000000..{count - 1:06d}}}.tar"
            cmd = [sys.executable, __file__, "--stream", urls, "--workers", str(args.workers)]
            peak, out = peak_rss(cmd)
            results[count] = {"samples": int(out.strip()), "peak_rss_mib": peak / 2**20}
            print(f"{count:>5} shards  {int(out):>7} samples  peak RSS {peak / 2**20:8.1f} MiB")
    small, big = results[args.shards], results[n]
    growth = big["peak_rss_mib"] / small["peak_rss_mib"] - 1
    print(f"peak memory growth for 10x shards: {growth:+.1%} (goal: within 5 %)")
    print(json.dumps({"results": results, "growth": growth}))


if __name__ == "__main__":
    main()
