"""Captions from several fields, caption dropout, metadata filters, aspect buckets, resampled
mode, dataset weights and remote (HTTP, ``pipe:``) shards."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

import img2dataset_env as env
import pytest
from PIL import Image

from data.buckets import AspectBuckets
from data.datamodule import WebDatasetDataModule
from data.metadata import MetadataFilter
from data.shards import write_shards


def _png(w: int, h: int, colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, format="PNG")
    return buf.getvalue()


def _write(path: Path, samples: list[dict[str, Any]]) -> str:
    for s in samples:
        if "json" in s and not isinstance(s["json"], (bytes, str)):
            s["json"] = json.dumps(s["json"])
    write_shards(samples, str(path) + "-%06d.tar", maxcount=10_000)
    return str(path) + "-000000.tar"


def _all(dm: WebDatasetDataModule) -> list[dict[str, Any]]:
    return list(dm.train_dataloader())


def _module(urls: Any, **kw: Any) -> WebDatasetDataModule:
    kw = {"resolution": 16, "batch_size": 4, "shuffle_buffer": 0, "tokenizer": None} | kw
    return WebDatasetDataModule(urls, **kw)


def test_caption_fields_weights_and_dropout(tmp_path: Path) -> None:
    samples = [
        {"__key__": f"k{i:03d}", "png": _png(8, 8), "txt": f"txt {i}", "json": {"alt": f"alt {i}"}}
        for i in range(200)
    ]
    samples[5]["json"] = {}  # no alt: this sample can only use txt
    urls = _write(tmp_path / "cap", samples)
    fields = {"txt": 1.0, "json.alt": 3.0}
    captions = [c for b in _all(_module(urls, caption_fields=fields)) for c in b["caption"]]
    kinds = Counter(c.split()[0] for c in captions)
    assert sum(kinds.values()) == 200 and 0.65 < kinds["alt"] / 200 < 0.85
    by_key = {
        k: c
        for b in _all(_module(urls, caption_fields=fields))
        for k, c in zip(b["key"], b["caption"], strict=True)
    }
    assert by_key["k005"] == "txt 5"
    keys = [f"k{i:03d}" for i in range(200)]
    assert by_key == dict(zip(keys, captions, strict=True))  # seeded: the same draw twice
    only_alt = [c for b in _all(_module(urls, caption_fields="json.alt")) for c in b["caption"]]
    # Image-only mode (no tokenizer) keeps the caption-less sample with an empty caption.
    assert sorted(c.split()[0] if c else "" for c in only_alt).count("alt") == 199
    assert only_alt.count("") == 1
    dropped = [c for b in _all(_module(urls, caption_dropout=0.3)) for c in b["caption"]]
    assert 0.2 < dropped.count("") / 200 < 0.4


def test_metadata_filters_drop_and_count(tmp_path: Path) -> None:
    metas = [
        {"original_width": 64, "original_height": 64, "aesthetic": 6.0, "pwatermark": 0.1},
        {"original_width": 20, "original_height": 64, "aesthetic": 6.0, "pwatermark": 0.1},
        {"original_width": 64, "original_height": 64, "aesthetic": 4.0, "pwatermark": 0.1},
        {"original_width": 64, "original_height": 64, "aesthetic": 6.0, "pwatermark": 0.9},
        {"original_width": 64, "original_height": 64},
        {"original_width": 200, "original_height": 50, "aesthetic": 7.0, "pwatermark": 0.0},
    ]
    samples = [
        {"__key__": f"m{i}", "png": _png(8, 8), "txt": "x", "json": m} for i, m in enumerate(metas)
    ]
    urls = _write(tmp_path / "meta", samples * 1)
    keep = MetadataFilter(
        min_width=32,
        max_aspect=3.0,
        min_scores={"json.aesthetic": 5.0},
        max_scores={"json.pwatermark": 0.5},
    )
    batches = _all(_module(urls, batch_size=6, metadata_filter=keep))
    assert sorted(k for b in batches for k in b["key"]) == ["m0"]
    skipped = Counter()
    for b in batches:
        skipped.update({k: v for k, v in b["skipped"].items() if v})
    # m5 is 4:1 (aspect), m1 narrow (small), m2/m3/m4 scores (m4 lacks them).
    assert skipped == {"filtered_small": 1, "filtered_score": 3, "filtered_aspect": 1}


@pytest.mark.parametrize("per_bucket", [(8, 8, 8), (7, 9, 8)])
def test_aspect_buckets_batch_one_shape(tmp_path: Path, per_bucket: tuple[int, ...]) -> None:
    # wide, tall and square images; (7, 9, 8) leaves batches that straddle two buckets.
    kinds = [[(64, 32), (60, 30)], [(32, 64), (30, 60)], [(48, 48), (40, 40)]]
    sizes = [kinds[b][i % 2] for b, n in enumerate(per_bucket) for i in range(n)]
    samples = [
        {"__key__": f"b{i:02d}", "png": _png(w, h), "txt": "x"} for i, (w, h) in enumerate(sizes)
    ]
    urls = _write(tmp_path / "aspect", samples)
    buckets = AspectBuckets(16, step=4, max_ratio=2.0)
    assert buckets.sizes == [(12, 20), (16, 16), (20, 12)]  # (w, h), ~16^2 px, sides % 4
    batches = _all(_module(urls, batch_size=4, buckets=buckets, shuffle_buffer=24))
    assert sorted(k for b in batches for k in b["key"]) == sorted(s["__key__"] for s in samples)
    moved = 0
    for b in batches:
        h, w = b["pixel_values"].shape[2:]
        assert (b["target_size"] == b["target_size"][0]).all()
        assert tuple(b["target_size"][0].tolist()) == (h, w)
        for key, orig in zip(b["key"], b["original_size"].tolist(), strict=True):
            sw, sh = sizes[int(key[1:])]
            assert orig == [sh, sw]
            moved += buckets.size(sw, sh) != (w, h)
    assert {tuple(b["pixel_values"].shape[2:]) for b in batches} == {(12, 20), (20, 12), (16, 16)}
    # Only batches at a bucket boundary hold samples of another bucket (resized to the batch's).
    assert moved == (0 if per_bucket == (8, 8, 8) else 2)


def test_resampled_mode_and_dataset_weights(tmp_path: Path) -> None:
    a = _write(
        tmp_path / "a", [{"__key__": f"a{i}", "png": _png(8, 8), "txt": "a"} for i in range(40)]
    )
    b = _write(
        tmp_path / "b", [{"__key__": f"b{i}", "png": _png(8, 8), "txt": "b"} for i in range(40)]
    )
    datasets = [{"urls": a, "weight": 3.0}, {"urls": b, "weight": 1.0}]
    dm = _module(None, datasets=datasets, resampled=True, steps_per_epoch=25, shuffle_buffer=8)
    loader = dm.train_dataloader()
    epochs = [[k for batch in loader for k in batch["key"]] for _ in range(4)]
    assert [len(e) for e in epochs] == [100] * 4
    share = sum(k.startswith("a") for e in epochs for k in e) / 400
    assert 0.6 < share < 0.9  # a weighs 3:1
    again = _module(None, datasets=datasets, resampled=True, steps_per_epoch=25, shuffle_buffer=8)
    assert [k for batch in again.train_dataloader() for k in batch["key"]] == epochs[0]
    # Epoch mode: a weight is how often a dataset is read per epoch.
    epoch = _module(None, datasets=[{"urls": a, "weight": 2.0}, {"urls": b, "weight": 1.0}])
    keys = Counter(k for batch in epoch.train_dataloader() for k in batch["key"])
    assert {keys[f"a{i}"] for i in range(40)} == {2} and {keys[f"b{i}"] for i in range(40)} == {1}


@pytest.fixture
def http_root(tmp_path: Path) -> Any:
    root = tmp_path / "www"
    root.mkdir()
    with env.serve_directory(root) as base:
        yield root, base


def test_http_and_pipe_shards_read_like_local(http_root: Any, tmp_path: Path) -> None:
    root, base = http_root
    samples = [{"__key__": f"r{i:02d}", "png": _png(8, 8), "txt": f"c{i}"} for i in range(12)]
    local = _write(root / "remote", samples)
    expected = [k for b in _all(_module(local)) for k in b["key"]]
    url = f"{base}/remote-000000.tar"
    with pytest.raises(ValueError, match="sizes.json"):
        _module(url)
    (root / "sizes.json").write_text(json.dumps({"remote-000000.tar": 12}))
    assert [k for b in _all(_module(url)) for k in b["key"]] == expected
    pipe = f"pipe:cat {local}"
    with pytest.raises(ValueError, match="data.sizes_file"):
        _module(pipe)
    sizes = tmp_path / "sizes.json"
    sizes.write_text(json.dumps({pipe: 12}))
    assert [k for b in _all(_module(pipe, sizes_file=str(sizes))) for k in b["key"]] == expected


def test_zero_byte_member_is_counted(tmp_path: Path) -> None:
    samples = [{"__key__": f"z{i}", "png": _png(8, 8), "txt": "x"} for i in range(4)]
    samples[2]["png"] = b""
    urls = _write(tmp_path / "zero", samples)
    batches = _all(_module(urls, batch_size=2))
    assert [k for b in batches for k in b["key"]] == ["z0", "z1", "z3"]
    assert sum(b["skipped"]["empty_member"] for b in batches) == 1


def test_latent_of_another_bucket_is_dropped_not_resized() -> None:
    import random

    import numpy as np

    from data.decoders import LatentDecoder
    from data.transforms import SkipCounter

    def npy(shape: tuple[int, ...]) -> bytes:
        buf = io.BytesIO()
        np.save(buf, np.zeros(shape, np.float16), allow_pickle=False)
        return buf.getvalue()

    counter = SkipCounter(0.5, "test")
    decoder = LatentDecoder(counter)
    raw = {"__key__": "l0", "latent.npy": npy((8, 2, 4)), "emb.npy": npy((3, 5)), "txt": b"x"}
    assert decoder.bucket_of(raw) == (8, 2, 4)
    sample = decoder(raw, random.Random(0), (8, 2, 4))
    assert sample["latent_moments"].shape == (8, 2, 4) and sample["caption"] == "x"
    assert decoder(raw, random.Random(0), (8, 4, 2)) is None
    assert counter.totals["filtered_bucket"] == 1
