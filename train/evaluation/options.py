"""What an evaluation takes on the command line: the flags `ldm-eval` parses, and the ones the
evaluation job `ldm-submit --eval=...` renders (and checks on the login node).

Light on purpose (argparse, safetensors' numpy reader, the shard list): `ldm-submit` answers a
missing reference or an empty prompt file in a second, before anything is queued.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from train.errors import ConfigError, positive_int

REFERENCE_FORMAT = "ldm-pipeline/reference-features/1"  # metadata "format" of ldm-data stats files


def add_feature_args(parser: Any, required: bool = True) -> None:
    """The feature-extractor flags, shared by every command that computes FID/KID."""
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument(
        "--clip-model", metavar="DIR_OR_ID", help="CLIP features (folder or hub id); ldm-eval "
        "also scores CLIP score with it"
    )  # fmt: skip
    group.add_argument(
        "--inception", metavar="FILE", help="FID's Inception (inception-2015-12-05.pt)"
    )


def add_evaluation_args(p: Any, schedulers: list[str] | None = None) -> None:
    """Sampling, the quality inputs and the watch-mode settings (not the export or run folder)."""
    p.add_argument("--num-samples", type=positive_int, default=96)
    p.add_argument("--steps", type=positive_int, default=25)
    p.add_argument("--guidance-scale", "--cfg", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scheduler", choices=schedulers, default=None,
                   help="default: ddim; a flow-matching export's own sampler")  # fmt: skip
    q = p.add_argument_group("FID, KID and CLIP score (instead of the shapes held-out set)")
    q.add_argument("--reference", metavar="FILE", help="ldm-data stats of the real set")
    q.add_argument("--prompts", metavar="FILE", help="one prompt per line")
    q.add_argument("--val-urls", metavar="SHARDS",
                   help="the reference's set (checked); its captions are the prompts")  # fmt: skip
    add_feature_args(q, required=False)
    w = p.add_argument_group("evaluation job: a run's checkpoints as they are written")
    w.add_argument("--poll-seconds", type=float, default=30.0)
    w.add_argument("--idle-timeout", type=float, default=7200.0,
                   help="--watch stops when nothing new appears for this long (s)")  # fmt: skip
    w.add_argument("--tracking-uri", default=None,
                   help="default: the run's own (its config.yaml), else MLFLOW_TRACKING_URI")
    w.add_argument("--allow-pickle", action="store_true",
                   help="read sharded DeepSpeed/FSDP checkpoint folders (only ones you trust)")


def check_inputs(args: argparse.Namespace, where: str = "") -> None:
    """The named files exist and fit together; ConfigError naming the flag otherwise. What needs
    the models (the extractor a reference was made with) is checked where they load."""
    from train.evaluation.prompts import read_prompts

    where = f"{where} " if where else ""
    if args.reference and not (args.clip_model or args.inception):
        raise ConfigError(f"{where}--reference needs the extractor it was made with: "
                          "--clip-model or --inception")  # fmt: skip
    if args.reference and not (args.prompts or args.val_urls):
        raise ConfigError(f"{where}--reference needs --prompts FILE or --val-urls SHARDS "
                          "(the set the reference was made from)")  # fmt: skip
    if args.prompts:
        read_prompts(args.prompts, f"{where}--prompts")
    if args.inception and not Path(args.inception).is_file():
        raise ConfigError(f"{where}--inception {args.inception}: no such file "
                          "(clean-fid's inception-2015-12-05.pt)")  # fmt: skip
    if args.clip_model and _looks_local(args.clip_model) and not Path(args.clip_model).is_dir():
        raise ConfigError(f"{where}--clip-model {args.clip_model}: no such CLIP model folder "
                          "(one saved with save_pretrained, or a hub id)")  # fmt: skip
    if args.reference:
        check_reference_set(args.reference, args.val_urls, f"{where}--reference")


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).exists() or name.count("/") > 1


def reference_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a reference features file (`ldm-data stats`); ConfigError otherwise."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise ConfigError(f"reference statistics {path} do not exist; write them with "
                          "`ldm-data stats SHARDS OUT`")  # fmt: skip
    with safe_open(str(path), "numpy") as f:
        meta = f.metadata() or {}
    if meta.get("format") != REFERENCE_FORMAT:
        raise ConfigError(f"{path} is not a reference features file ({meta.get('format')!r})")
    return meta


def check_same_set(meta: dict[str, str], path: str | Path, urls: str | list[str]) -> None:
    """The reference file at `path` (its `meta`) was computed for the set at `urls`."""
    from data.evalset import set_fingerprint

    sha, _, total = set_fingerprint(urls)
    if sha != meta.get("set_sha256"):
        raise ConfigError(
            f"reference statistics {path} belong to another set ({meta.get('set_num_samples')} "
            f"samples, manifest {meta.get('set_sha256', '')[:12]}), not {urls} ({total} samples, "
            f"manifest {sha[:12]}): the set changed; recompute with `ldm-data stats`"
        )


def check_reference_set(path: str, val_urls: str | None, setting: str) -> None:
    """The file is a reference features file and, with `val_urls`, one of that set."""
    try:
        meta = reference_metadata(path)
        if val_urls is not None:
            check_same_set(meta, path, val_urls)
    except ConfigError as e:
        raise ConfigError(f"{setting}: {e}") from None
