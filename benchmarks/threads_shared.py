"""Training steps/s of the demo's UNet alone and beside a second job of the same kind, for each
torch thread count and OpenMP wait policy: what `threads` and OMP_WAIT_POLICY in ldm-train are
chosen from (train/config/threads.py).

    python benchmarks/threads_shared.py [--threads 1,2] [--seconds 8] [--batch 32]

One step is `ldm-train experiment=demo`'s from precomputed latents: the UNet's forward on noised
latents [B, 4, 16, 16] with text states [B, 32, 384], MSE loss, backward, AdamW step. Each point
runs in fresh processes (OpenMP reads its policy when torch loads). "Shared" starts two such
processes with the same settings; both build and warm up, then time their steps over the same
window of ``--seconds``. With 2 jobs on N CPUs the fair share is half of what one job gets alone
when it can use all of them. Prints a table; writes benchmarks/results/threads_shared.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from machine import cpu_model  # benchmarks/ is the script's folder, on sys.path

RESULTS = Path(__file__).parent / "results"
# How idle OpenMP threads wait: GNU OpenMP's own (spin ~300k times, then sleep), a shorter spin,
# or sleep at once.
POLICIES = {
    "default": {},
    "spin 10k": {"GOMP_SPINCOUNT": "10000"},
    "spin 1k": {"GOMP_SPINCOUNT": "1000"},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
}
OMP_KEYS = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")


def child(args: argparse.Namespace) -> None:
    """Build, warm up, say "ready", wait for "go" on stdin, then time steps: one JSON line."""
    import torch

    from train.config.compose import compose
    from train.models.conditioning import Conditioning

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from hydra.utils import instantiate

    backbone = instantiate(compose(["experiment=demo"]).model.backbone)
    cfg = backbone.model.config
    x = torch.randn(args.batch, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    cond = Conditioning(hidden=torch.randn(args.batch, 32, cfg.cross_attention_dim))
    t, target = torch.rand(args.batch) * 1000, torch.randn_like(x)
    opt = torch.optim.AdamW(backbone.parameters(), lr=1e-5)

    def step() -> None:
        pred = backbone.predict(backbone.model, x, t, cond)
        torch.nn.functional.mse_loss(pred, target).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    print("ready", flush=True)
    sys.stdin.readline()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        step()
        steps += 1
    print(json.dumps({"steps_per_s": steps / (time.perf_counter() - start)}), flush=True)


def point(threads: int, policy: str, jobs: int, args: argparse.Namespace) -> list[float]:
    """Steps/s of each of `jobs` concurrent children with these settings."""
    env = {k: v for k, v in os.environ.items() if k not in OMP_KEYS} | POLICIES[policy]
    cmd = [sys.executable, __file__, "--child", "--threads", str(threads),
           "--seconds", str(args.seconds), "--batch", str(args.batch)]  # fmt: skip
    procs = [subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True) for _ in range(jobs)]  # fmt: skip
    for p in procs:
        assert p.stdout.readline().strip() == "ready", f"{cmd} did not start"
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    rates = [json.loads(p.communicate(timeout=600)[0].splitlines()[-1])["steps_per_s"]
             for p in procs]  # fmt: skip
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    parser.add_argument("--policies", default=",".join(POLICIES), help=f"of {list(POLICIES)}")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.threads = int(args.threads)
        return child(args)

    rows = []
    print(f"{cpu_model()}, {len(os.sched_getaffinity(0))} CPUs; demo UNet, batch {args.batch}")
    print(f"{'threads':>7} {'OpenMP wait':>11} {'alone it/s':>10} {'shared it/s':>11} {'ratio':>6}")
    for threads in [int(n) for n in args.threads.split(",")]:
        for policy in args.policies.split(","):
            alone = point(threads, policy, 1, args)[0]
            shared = min(point(threads, policy, 2, args))  # the slower job of the two
            ratio = shared / alone
            rows.append({"threads": threads, "omp_wait_policy": policy, "alone": alone,
                         "shared_slower_job": shared, "shared_over_alone": ratio})  # fmt: skip
            print(f"{threads:>7} {policy:>11} {alone:>10.2f} {shared:>11.2f} {ratio:>6.2f}")
    RESULTS.mkdir(exist_ok=True)
    out = {"cpu": cpu_model(), "cpus": len(os.sched_getaffinity(0)), "batch": args.batch,
           "points": rows}  # fmt: skip
    (RESULTS / "threads_shared.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
