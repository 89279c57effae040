"""``ldm-data stats``: reference features of a validation set's real images, for FID and KID.

Computed once per set and feature extractor; evaluations refuse the file for another set (its
manifest hash differs) or another extractor.
"""

from __future__ import annotations

import argparse
from typing import Any

from torch import nn

from train.evaluation.options import add_feature_args


def feature_from_args(args: argparse.Namespace) -> nn.Module:
    from train.evaluation.features import ClipImageFeatures, TorchScriptInception

    if args.inception:
        return TorchScriptInception(args.inception)
    return ClipImageFeatures(args.clip_model)


def _stats(args: argparse.Namespace) -> int:
    from data.sources import resolve_shards
    from train.evaluation.reference import compute_reference

    resolve_shards(args.urls)  # a missing set is said before any model loads
    feature = feature_from_args(args)
    meta = compute_reference(args.urls, feature, args.out, args.resolution,
                             args.max_samples or None, args.batch_size)  # fmt: skip
    print(f"wrote {args.out}: {meta['num_samples']} images of {meta['set_num_samples']} "
          f"(manifest {meta['set_sha256'][:12]}), features {meta['feature']}")  # fmt: skip
    return 0


def add_stats(sub: Any) -> None:
    p = sub.add_parser("stats", help="reference features of a set's real images (FID, KID)",
                       description=__doc__)  # fmt: skip
    p.add_argument("urls", metavar="URLS", help="the validation shards, as data.val_urls")
    p.add_argument("out", metavar="OUT", help="the reference file to write (.safetensors)")
    add_feature_args(p)
    p.add_argument("--resolution", type=int, default=64,
                   help="images are resized and centre-cropped to this side: the size the model "
                   "generates")  # fmt: skip
    p.add_argument("--max-samples", type=int, default=0, help="the first N images (0: all)")
    p.add_argument("--batch-size", type=int, default=32)
    p.set_defaults(func=_stats)
