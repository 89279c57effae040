"""``ldm-data``: write the shapes demo shards, list held-out captions, turn a folder of captioned
images into shards, inspect and validate shards, encode them, compute reference statistics."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data.folder import TABLE_SUFFIXES, folder_to_shards
from data.shapes import heldout_specs
from data.shards import HELDOUT, MANIFEST, SHARD_PREFIX, ensure_demo_shards, shard_pattern
from data.shards_video import write_motion_demo_shards
from data.tools import DEFAULT_MAX_PIXELS, inspect_shards, validate_shards, write_sizes
from train.cli.reference_stats import add_stats
from train.errors import BAD_INPUT, ArgumentParser, debug_flag, report

MAX_LISTED = 5  # skipped files or bad samples printed to the console; the rest are counted


def _demo(args: argparse.Namespace) -> int:
    out = Path(args.out)
    manifest_path = out / MANIFEST
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        print(f"{manifest_path} exists; not rewriting (delete {out} to regenerate)")
    else:
        clip = {"frames": args.frames, "fps": args.fps} if args.command == "demo-video" else {}
        ensure_demo_shards(
            out,
            writer=args.writer,
            num_samples=args.num_samples,
            samples_per_shard=args.samples_per_shard,
            size=args.size,
            seed=args.seed,
            heldout_seed=args.heldout_seed,
            progress=True,
            **clip,
        )
        manifest = json.loads(manifest_path.read_text())
        print(f"wrote {manifest['num_samples']} samples in {manifest['num_shards']} shards")
    print(f"held-out captions: {out / HELDOUT}")
    prefix = manifest["pattern"].split("{", 1)[0] if "pattern" in manifest else SHARD_PREFIX
    print(f"shards: {shard_pattern(out, manifest['num_shards'], prefix)}")
    return 0


def _heldout(args: argparse.Namespace) -> int:
    path = Path(args.out) / HELDOUT
    if path.exists():
        captions = json.loads(path.read_text())
    else:
        captions = [s.caption for s in heldout_specs(seed=args.heldout_seed)]
    print("\n".join(captions))
    return 0


def _listed(paths: list[str]) -> str:
    more = f" ... (+{len(paths) - MAX_LISTED})" if len(paths) > MAX_LISTED else ""
    return ", ".join(paths[:MAX_LISTED]) + more


def _from_folder(args: argparse.Namespace) -> int:
    result = folder_to_shards(
        args.src,
        args.out,
        captions_table=args.captions_csv,
        path_col=args.path_col,
        caption_col=args.caption_col,
        samples_per_shard=args.samples_per_shard,
        prefix=args.prefix,
        progress=True,
    )
    print(f"{result.images} images, {len(result.no_caption)} without caption skipped")
    if result.no_caption:
        print(f"  without caption: {_listed(result.no_caption)}")
    if result.unreadable:
        print(f"{len(result.unreadable)} unreadable images skipped: {_listed(result.unreadable)}")
    if result.unmatched_rows:
        rows, table = result.unmatched_rows, args.captions_csv
        print(f"{len(rows)} rows of {table} name no image in {args.src}: {_listed(rows)}")
    last = len(result.shards) - 1
    pattern = Path(args.out) / f"{args.prefix}-{{000000..{last:06d}}}.tar"
    print(f"wrote {result.written} samples in {len(result.shards)} shards: {pattern}")
    return 0


def _print_histogram(title: str, counts: dict[str, int]) -> None:
    print(title)
    top = max(counts.values(), default=0) or 1
    for label, n in counts.items():
        print(f"  {label:>10} {n:>9}  {'#' * round(40 * n / top)}")


def _print_inspection(stats: dict[str, Any]) -> None:
    print(
        f"{stats['shards']} shards, {stats['samples']} samples "
        f"(statistics of the first {stats['samples_inspected']}), "
        f"{stats['tar_errors']} tar errors"
    )
    print("members: " + ", ".join(f"{k} {n}" for k, n in stats["members"].items()))
    _print_histogram("width (px)", stats["width"])
    _print_histogram("height (px)", stats["height"])
    _print_histogram("aspect ratio (width / height)", stats["aspect_ratio"])
    if stats["no_size"]:
        print(f"  no size known for {stats['no_size']} samples")
    if "video" in stats:
        _print_videos(stats["video"])
    words = stats["caption_words"]
    _print_histogram(f"caption words ({words['missing']} without caption)", words["histogram"])
    print("  " + " ".join(f"{p}={v}" for p, v in words["percentiles"].items()))
    print("example captions")
    for example in stats["examples"]:
        print(f"  {example['key']}: {example['caption'][:120]}")


def _print_videos(video: dict[str, Any]) -> None:
    print(f"videos: {video['videos']} ({video['unreadable']} with an unreadable header)")
    for name, unit in (("duration_s", "s"), ("frames", "frames")):
        print(f"  {name.split('_')[0]} ({unit}): "
              + " ".join(f"{p}={v:g}" for p, v in video[name].items()))  # fmt: skip
    print("  fps: " + ", ".join(f"{k} ({n})" for k, n in video["fps"].items()))
    print("  sizes: " + ", ".join(f"{k} ({n})" for k, n in video["sizes"].items()))


def _inspect(args: argparse.Namespace) -> int:
    stats = inspect_shards(args.urls, samples=args.samples, progress=True)
    if args.json:
        print(json.dumps(stats, indent=1))
    else:
        _print_inspection(stats)
    if args.write_sizes:
        written, remote = write_sizes(stats["samples_per_shard"])
        # stderr, so `--json` output stays parseable.
        for path in written:
            print(f"wrote {path}", file=sys.stderr)
        if remote:
            print(
                f"sizes.json not written for {len(remote)} remote shards: write it beside them "
                "from the samples_per_shard of --json",
                file=sys.stderr,
            )
    return 0


def _validate(args: argparse.Namespace) -> int:
    summary = validate_shards(
        args.urls,
        max_pixels=args.max_pixels,
        workers=args.workers,
        report=args.report,
        progress=True,
    )
    print(
        f"checked {summary.samples} samples in {summary.shards} shards: "
        f"{summary.bad_samples} bad samples"
    )
    for reason, n in summary.by_reason.items():
        if n:
            print(f"  {reason:<16} {n}")
    for p in summary.examples[:MAX_LISTED]:
        key = p.key if p.key is not None else "(rest of shard)"
        print(f"  {Path(p.shard).name} {key} {p.reason}: {p.detail[:120]}")
    if args.report:
        print(f"report: {args.report}")
    return 0 if summary.ok else 1


def _add_data_tools(sub: Any) -> None:
    folder = sub.add_parser(
        "from-folder",
        help="write the captioned images of a folder as shards in img2dataset's layout",
        description="Captions come from NAME.txt beside each image, or from --captions-csv.",
    )
    folder.add_argument("src", metavar="SRC", help="folder of .jpg/.jpeg/.png/.webp (recursive)")
    folder.add_argument("out", metavar="OUT", help="where the shards and sizes.json go")
    folder.add_argument(
        "--captions-csv",
        metavar="FILE",
        help=f"table ({'/'.join(TABLE_SUFFIXES)}) of image paths relative to SRC and captions; "
        "other columns go into each sample's json",
    )
    folder.add_argument("--path-col", default="path")
    folder.add_argument("--caption-col", default="caption")
    folder.add_argument("--samples-per-shard", type=int, default=1000)
    folder.add_argument("--prefix", default="shard", help="shards are PREFIX-000000.tar ...")
    folder.set_defaults(func=_from_folder)

    inspect = sub.add_parser("inspect", help="count samples, image sizes and caption lengths")
    inspect.add_argument("urls", metavar="URLS", nargs="+", help="as data.urls accepts")
    inspect.add_argument(
        "--samples", type=int, default=5000, help="statistics of the first N samples (0: all)"
    )
    inspect.add_argument("--json", action="store_true", help="print a JSON object instead")
    inspect.add_argument(
        "--write-sizes", action="store_true", help="write sizes.json beside local shards"
    )
    inspect.set_defaults(func=_inspect)

    validate = sub.add_parser(
        "validate",
        help="decode every sample and report those the loader would skip (exit 1 if any)",
    )
    validate.add_argument("urls", metavar="URLS", nargs="+", help="as data.urls accepts")
    validate.add_argument("--report", metavar="FILE.jsonl", help="one line per problem")
    validate.add_argument(
        "--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="as data.max_pixels"
    )
    validate.add_argument("--workers", type=int, default=1, help="processes, one shard each")
    validate.set_defaults(func=_validate)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="ldm-data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="render the procedural shapes set into OUT")
    demo.add_argument("out", metavar="OUT")
    demo.add_argument("--num-samples", type=int, default=4000)
    demo.add_argument("--samples-per-shard", type=int, default=500)
    demo.add_argument("--size", type=int, default=64)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--heldout-seed", type=int, default=0)
    demo.set_defaults(func=_demo, writer=None)
    video = sub.add_parser("demo-video", help="render the moving-shapes clips into OUT (mp4)")
    video.add_argument("out", metavar="OUT")
    video.add_argument("--num-samples", type=int, default=2000)
    video.add_argument("--samples-per-shard", type=int, default=500)
    video.add_argument("--size", type=int, default=32)
    video.add_argument("--frames", type=int, default=9)
    video.add_argument("--fps", type=int, default=8)
    video.add_argument("--seed", type=int, default=0)
    video.add_argument("--heldout-seed", type=int, default=0)
    video.set_defaults(func=_demo, writer=write_motion_demo_shards)
    held = sub.add_parser("heldout", help="print the held-out captions of a demo set in OUT")
    held.add_argument("out", metavar="OUT")
    held.add_argument("--heldout-seed", type=int, default=0, help="used when OUT has no list")
    held.set_defaults(func=_heldout)
    _add_data_tools(sub)
    _add_encode(sub)
    add_stats(sub)
    return parser


def _check_encode_config(overrides: list[str]) -> None:
    """The overrides compose, the shards exist and carry captions: said in a second, before
    torch and the models load."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from train.config.checks import check_data
    from train.config.compose import compose
    from train.errors import ConfigError

    try:
        check_data(compose(overrides))
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(str(e)) from None


def _encode(args: argparse.Namespace) -> int:
    _check_encode_config(args.overrides)
    from train.cli.encode import run_cli  # torch and the models load only for this command

    return run_cli(args)


def _add_encode(sub: Any) -> None:
    p = sub.add_parser(
        "encode",
        help="precompute VAE latents and text embeddings into new shards",
        description="Overrides are ldm-train's: the VAE, text encoder, resolution, captions, "
        "buckets and filters come from the same config. Train with data.urls=OUT "
        "data.latents=true.",
    )
    p.add_argument("out", metavar="OUT", help="folder for the encoded shards")
    p.add_argument("overrides", nargs="*", help="ldm-train overrides (data.urls=..., model...)")
    p.add_argument("--workers", type=int, default=1, help="processes (one per GPU on GPUs)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    p.set_defaults(func=_encode)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (*BAD_INPUT, ValueError) as exn:
        # Errors raised with a message that names the file or setting and the fix.
        return report(f"ldm-data {args.command}: error:", str(exn), debug_flag(args))


if __name__ == "__main__":
    sys.exit(main())
