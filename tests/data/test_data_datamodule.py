"""WebDatasetDataModule: shard resolution, batch contents, worker splitting, bad-sample skipping."""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import random
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.utilities import move_data_to_device
from PIL import Image

from data.buckets import resize_crop
from data.datamodule import WebDatasetDataModule, resolve_shards
from data.shapes import parse_caption, predict, render
from data.shards import jpeg_bytes, write_demo_shards, write_shards
from data.transforms import ALL_REASONS, SKIP_REASONS, decode_image

NUM_SAMPLES = 48
PER_SHARD = 16


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_demo_shards(out, num_samples=NUM_SAMPLES, samples_per_shard=PER_SHARD, size=32)
    return out


def _module(urls: Any, tokenizer: Any, **kw: Any) -> WebDatasetDataModule:
    kw = {"resolution": 32, "batch_size": 4, "shuffle_buffer": 0} | kw
    return WebDatasetDataModule(urls, tokenizer, **kw)


def _keys(loader: Any) -> list[str]:
    return [key for batch in loader for key in batch["key"]]


def _sum_skipped(batches: list[dict[str, Any]]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for batch in batches:
        total.update(batch["skipped"])
    return {k: v for k, v in total.items() if v}


def test_batch_contents(shard_dir: Path, tokenizer: Any) -> None:
    dm = _module(str(shard_dir / "shapes-{000000..000002}.tar"), tokenizer, shuffle_buffer=100)
    batches = list(dm.train_dataloader())
    assert len(batches) == NUM_SAMPLES // 4
    batch = batches[0]
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    assert batch["pixel_values"].dtype == torch.float32
    assert batch["pixel_values"].min() >= -1.0 and batch["pixel_values"].max() <= 1.0
    assert batch["pixel_values"].min() < -0.5 and batch["pixel_values"].max() > 0.5
    assert batch["input_ids"].shape == (4, 32) and batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].dtype == torch.long
    assert batch["skipped"] == dict.fromkeys(ALL_REASONS, 0)
    decoded = tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
    assert decoded == batch["caption"]
    assert all(len(k) == 9 and k.isdigit() for k in batch["key"])
    # Image and caption stay paired: the checker reads the caption back off the pixels.
    for pixels, caption in zip(batch["pixel_values"], batch["caption"], strict=True):
        spec = parse_caption(caption)
        pred = predict(pixels.numpy())
        assert (pred["colour"], pred["position"]) == (spec.colour, spec.position)


def test_lightning_transfer_keeps_metadata(shard_dir: Path, tokenizer: Any) -> None:
    batch = next(iter(_module(str(shard_dir), tokenizer).train_dataloader()))
    moved = move_data_to_device(batch, torch.device("cpu"))
    assert moved["skipped"] == dict.fromkeys(ALL_REASONS, 0)
    assert moved["caption"] == batch["caption"] and moved["key"] == batch["key"]


def test_workers_see_every_sample_once_per_epoch(shard_dir: Path, tokenizer: Any) -> None:
    dm = _module(str(shard_dir), tokenizer, num_workers=2, shuffle_buffer=8, seed=3)
    loader = dm.train_dataloader()
    first, second = _keys(loader), _keys(loader)
    expected = {f"{s:05d}{i:04d}" for s in range(3) for i in range(PER_SHARD)}
    for epoch in (first, second):
        assert len(epoch) == NUM_SAMPLES and set(epoch) == expected
    assert first != second  # reshuffled between epochs
    again = _keys(
        _module(
            str(shard_dir), tokenizer, num_workers=2, shuffle_buffer=8, seed=3
        ).train_dataloader()
    )
    assert again == first  # same seed, same order


def test_fewer_shards_than_workers(shard_dir: Path, tokenizer: Any) -> None:
    dm = _module(str(shard_dir / "shapes-000001.tar"), tokenizer, num_workers=2)
    keys = _keys(dm.train_dataloader())
    assert sorted(keys) == [f"00001{i:04d}" for i in range(PER_SHARD)]


def test_resolve_shards(shard_dir: Path, tmp_path: Path, tokenizer: Any) -> None:
    expected = [str(shard_dir / f"shapes-00000{i}.tar") for i in range(3)]
    assert resolve_shards(str(shard_dir / "shapes-{000000..000002}.tar")) == expected
    assert resolve_shards(str(shard_dir)) == expected
    assert resolve_shards(str(shard_dir / "shapes-*.tar")) == expected
    listing = tmp_path / "shards.txt"
    listing.write_text("# demo\n" + "\n".join(expected) + "\n\n")
    assert resolve_shards(str(listing)) == expected
    assert resolve_shards([expected[0], str(shard_dir / "shapes-{000001..000002}.tar")]) == expected
    remote = "s3://bucket/x-{0..1}.tar"
    assert resolve_shards(remote) == ["s3://bucket/x-0.tar", "s3://bucket/x-1.tar"]
    assert resolve_shards("pipe:curl -s http://h/a.tar") == ["pipe:curl -s http://h/a.tar"]
    missing = str(tmp_path / "nope-{000000..000003}.tar")
    with pytest.raises(FileNotFoundError, match="nope-") as info:
        _module(missing, tokenizer)
    assert "ldm-data demo" in str(info.value)
    with pytest.raises(FileNotFoundError, match="2 missing"):
        resolve_shards(str(shard_dir / "shapes-{000001..000004}.tar"))
    with pytest.raises(FileNotFoundError, match="no .tar"):
        resolve_shards(str(tmp_path))


def _good(key: str, seed: int, size: int = 32) -> dict[str, Any]:
    from data.shapes import train_specs

    spec = train_specs()[seed % 243]
    image = render(spec, size, np.random.default_rng(seed))
    return {"__key__": key, "jpg": jpeg_bytes(image), "txt": spec.caption}


def test_bad_samples_are_skipped_and_counted(
    tmp_path: Path, tokenizer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    samples = [_good(f"{i:09d}", i) for i in range(12)]
    samples.insert(3, {"__key__": "corrupt", "jpg": b"\xff\xd8 not a jpeg", "txt": "a cat"})
    samples.insert(7, {"__key__": "nocaption", "jpg": _good("x", 0)["jpg"]})
    write_shards(samples, str(tmp_path / "bad-%06d.tar"), maxcount=100)
    dm = _module(str(tmp_path / "bad-000000.tar"), tokenizer, batch_size=2)
    with caplog.at_level(logging.WARNING, logger="data.transforms"):
        batches = list(dm.train_dataloader())
    keys = [k for b in batches for k in b["key"]]
    assert keys == [f"{i:09d}" for i in range(12)]
    assert _sum_skipped(batches) == {"decode_error": 1, "missing_caption": 1}
    assert "corrupt" in caplog.text and "decode_error" in caplog.text


def test_other_skip_reasons(tmp_path: Path, tokenizer: Any) -> None:
    samples = [_good(f"{i:09d}", i, size=16) for i in range(8)]
    samples.insert(2, _good("big", 1, size=32))  # 1024 px > max_pixels
    samples.insert(5, {"__key__": "textonly", "txt": "a red circle"})
    png = io.BytesIO()
    Image.new("RGB", (20, 16), (255, 0, 0)).save(png, format="PNG")
    samples.append({"__key__": "png", "png": png.getvalue(), "txt": "red"})
    write_shards(samples, str(tmp_path / "mixed-%06d.tar"), maxcount=100)
    three = [_good(f"t{i}", 9 + i, size=16) for i in range(3)]
    write_shards(three, str(tmp_path / "whole-%06d.tar"), maxcount=100)
    whole = (tmp_path / "whole-000000.tar").read_bytes()
    # Cut inside the last sample's image: the first two samples stay readable.
    cut = whole.index(b"t2.jpg") + 700
    (tmp_path / "mixed-000001.tar").write_bytes(whole[:cut])
    dm = _module(
        str(tmp_path / "mixed-{000000..000001}.tar"),
        tokenizer,
        resolution=16,
        batch_size=2,  # 14 counted samples: every one is read
        max_pixels=500,
    )
    batches = list(dm.train_dataloader())
    skipped = _sum_skipped(batches)
    assert skipped == {"too_large": 1, "missing_image": 1, "tar_error": 1}
    keys = {k for b in batches for k in b["key"]}
    assert {"png", "t0", "t1"} <= keys and "t2" not in keys
    assert "big" not in {k for b in batches for k in b["key"]}


def test_skip_rate_above_threshold_raises(tmp_path: Path, tokenizer: Any) -> None:
    samples = []
    for i in range(60):
        good = _good(f"{i:09d}", i, size=16)
        samples.append(good if i % 3 == 0 else good | {"jpg": b"garbage"})
    write_shards(samples, str(tmp_path / "rotten-%06d.tar"), maxcount=100)
    dm = _module(str(tmp_path / "rotten-000000.tar"), tokenizer, resolution=16)
    with pytest.raises(RuntimeError, match="max_skip_fraction"):
        list(dm.train_dataloader())
    lenient = _module(
        str(tmp_path / "rotten-000000.tar"), tokenizer, resolution=16, max_skip_fraction=0.9
    )
    assert len(_keys(lenient.train_dataloader())) == 20


def test_val_dataloader_is_deterministic(shard_dir: Path, tokenizer: Any) -> None:
    dm = _module(
        str(shard_dir),
        tokenizer,
        num_workers=2,
        shuffle_buffer=100,
        val_urls=str(shard_dir / "shapes-{000000..000001}.tar"),
        val_batches=3,
    )
    first = [b["key"] for b in dm.val_dataloader()]
    assert len(first) == 3 and all(len(k) == 4 for k in first)
    assert first == [b["key"] for b in dm.val_dataloader()]
    assert first[0] == [f"00000{i:04d}" for i in range(4)]
    assert _module(str(shard_dir), tokenizer).val_dataloader() == []


def test_transforms_resize_crop_and_alpha() -> None:
    wide = Image.new("RGB", (64, 32), (0, 0, 0))
    wide.paste((255, 255, 255), (16, 0, 48, 32))  # white middle half

    out, crop = resize_crop(wide, (16, 16), center_crop=True, flip=False, rng=random.Random(0))
    assert crop == (0, 8)
    # Centre crop keeps the white middle (bicubic rings a little at the borders).
    assert out.size == (16, 16) and np.asarray(out).mean() > 245
    crops = {
        np.asarray(resize_crop(wide, (16, 16), False, True, random.Random(s))[0]).mean()
        for s in range(8)
    }
    assert len(crops) > 1  # random crops move across the black/white edge
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    assert np.asarray(decode_image(buf.getvalue(), max_pixels=100)).min() == 255
    assert json.dumps(SKIP_REASONS)  # stable, serialisable reason names


def test_ranks_split_the_shards(
    shard_dir: Path, tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        seen.append(set(_keys(_module(str(shard_dir), tokenizer, seed=5).train_dataloader())))
    assert not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == NUM_SAMPLES
    assert [len(s) for s in seen] == [NUM_SAMPLES // 2] * 2  # 3 shards, yet equal halves


class _Recorder(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.keys: dict[int, list[str]] = {}
        self.skipped: Counter[str] = Counter()
        self.val_keys: list[str] = []

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        self.keys.setdefault(self.current_epoch, []).extend(batch["key"])
        self.skipped.update(batch["skipped"])
        return self.layer(batch["pixel_values"].mean((2, 3))).mean()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.val_keys.extend(batch["key"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_fit_with_workers(shard_dir: Path, tokenizer: Any) -> None:
    dm = _module(
        str(shard_dir),
        tokenizer,
        num_workers=2,
        shuffle_buffer=8,
        val_urls=str(shard_dir / "shapes-000000.tar"),
        val_batches=2,
    )
    model = _Recorder()
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=dm)
    assert sorted(model.keys) == [0, 1]
    for keys in model.keys.values():
        assert len(keys) == NUM_SAMPLES and len(set(keys)) == NUM_SAMPLES
    assert model.keys[0] != model.keys[1]
    assert set(model.skipped) == set(ALL_REASONS) and sum(model.skipped.values()) == 0
    assert model.val_keys == 2 * [f"00000{i:04d}" for i in range(8)]  # once per epoch
    # teardown stopped the persistent workers (else exit waits 5 s per worker).
    assert not multiprocessing.active_children()
