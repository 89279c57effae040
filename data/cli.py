"""``ldm-data``: write the shapes demo shards, list held-out captions."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from data.shapes import heldout_specs
from data.shards import HELDOUT, MANIFEST, ensure_demo_shards, shard_pattern


def _demo(args: argparse.Namespace) -> int:
    out = Path(args.out)
    manifest_path = out / MANIFEST
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        print(f"{manifest_path} exists; not rewriting (delete {out} to regenerate)")
    else:
        ensure_demo_shards(
            out,
            num_samples=args.num_samples,
            samples_per_shard=args.samples_per_shard,
            size=args.size,
            seed=args.seed,
            heldout_seed=args.heldout_seed,
            progress=True,
        )
        manifest = json.loads(manifest_path.read_text())
        print(f"wrote {manifest['num_samples']} samples in {manifest['num_shards']} shards")
    print(f"held-out captions: {out / HELDOUT}")
    print(f"shards: {shard_pattern(out, manifest['num_shards'])}")
    return 0


def _heldout(args: argparse.Namespace) -> int:
    path = Path(args.out) / HELDOUT
    if path.exists():
        captions = json.loads(path.read_text())
    else:
        captions = [s.caption for s in heldout_specs(seed=args.heldout_seed)]
    print("\n".join(captions))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ldm-data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="render the procedural shapes set into OUT")
    demo.add_argument("out", metavar="OUT")
    demo.add_argument("--num-samples", type=int, default=4000)
    demo.add_argument("--samples-per-shard", type=int, default=500)
    demo.add_argument("--size", type=int, default=64)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--heldout-seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    held = sub.add_parser("heldout", help="print the held-out captions of a demo set in OUT")
    held.add_argument("out", metavar="OUT")
    held.add_argument("--heldout-seed", type=int, default=0, help="used when OUT has no list")
    held.set_defaults(func=_heldout)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
