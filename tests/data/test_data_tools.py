"""``ldm-data from-folder``, ``inspect`` and ``validate`` through the CLI entry point, checked by
reading the shards back with the training data module."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from data import folder
from data.datamodule import WebDatasetDataModule
from data.shards import jpeg_bytes, write_shards
from data.sources import iter_raw_samples, resolve_shards
from train.cli.data import main

# name -> (size, caption or None); sorted by path this is the key order of the shards.
IMAGES = {
    "a.png": ((40, 20), "a wide red picture"),
    "b.jpg": ((30, 30), "a square"),
    "c.png": ((12, 12), None),  # no caption: skipped
    "sub/d.jpeg": ((16, 48), "a tall one in a subfolder"),
}
CAPTIONED = [name for name, (_, caption) in IMAGES.items() if caption]


def raise_on_error(exn: Exception) -> bool:
    raise exn


def make_folder(root: Path, txt_captions: bool = True) -> Path:
    src = root / "src"
    for i, (name, (size, caption)) in enumerate(IMAGES.items()):
        path = src / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (40 * i, 100, 200)).save(path)
        if caption and txt_captions:
            path.with_suffix(".txt").write_text(caption + "\n")
    (src / "notes.md").write_text("not an image")
    return src


def read_raw(out: Path) -> list[dict]:
    return [s for url in resolve_shards(str(out)) for s in iter_raw_samples(url, raise_on_error)]


def test_from_folder_round_trips_through_the_data_module(tmp_path, capsys):
    src, out = make_folder(tmp_path), tmp_path / "out"
    assert main(["from-folder", str(src), str(out), "--samples-per-shard", "2"]) == 0
    assert "4 images, 1 without caption skipped" in capsys.readouterr().out

    assert sorted(p.name for p in out.iterdir()) == [
        "shard-000000.tar",
        "shard-000001.tar",
        "sizes.json",
    ]
    assert json.loads((out / "sizes.json").read_text()) == {
        "shard-000000.tar": 2,
        "shard-000001.tar": 1,
    }
    raw = read_raw(out)
    assert [s["__key__"] for s in raw] == ["000000000", "000000001", "000000002"]
    for got, name in zip(raw, CAPTIONED, strict=True):
        member = "png" if name.endswith(".png") else "jpg"
        assert got[member] == (src / name).read_bytes()  # stored, not re-encoded
        assert got["txt"].decode() == IMAGES[name][1]
        meta = json.loads(got["json"])
        width, height = IMAGES[name][0]
        assert meta == {
            "key": got["__key__"],
            "caption": IMAGES[name][1],
            "width": width,
            "height": height,
            "original_width": width,
            "original_height": height,
            "source": name,
        }

    dm = WebDatasetDataModule(
        urls=str(out), tokenizer=None, resolution=16, batch_size=1, shuffle_buffer=0
    )
    assert dm.sizes == [2, 1]
    batches = list(dm.train_dataloader())
    got = {b["key"][0]: b["caption"][0] for b in batches}
    assert got == {f"{i:09d}": IMAGES[name][1] for i, name in enumerate(CAPTIONED)}
    assert all(b["pixel_values"].shape == (1, 3, 16, 16) for b in batches)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_from_folder_takes_captions_and_extra_columns_from_a_table(tmp_path, fmt):
    src, out = make_folder(tmp_path, txt_captions=False), tmp_path / "out"
    rows = [
        {"file": "b.jpg", "text": "from the table", "score": "0.5"},
        {"file": "sub/d.jpeg", "text": "a tall one", "score": "0.9"},
        {"file": "a.png", "text": "", "score": "0.1"},  # empty caption: skipped
        {"file": "gone.png", "text": "no such image", "score": "1"},
    ]
    table = tmp_path / f"captions.{fmt}"
    if fmt == "csv":
        lines = ["file,text,score"] + [f"{r['file']},{r['text']},{r['score']}" for r in rows]
        table.write_text("\n".join(lines) + "\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), table)
    args = ["from-folder", str(src), str(out), "--captions-csv", str(table)]
    assert main([*args, "--path-col", "file", "--caption-col", "text", "--prefix", "x"]) == 0

    raw = read_raw(out)
    assert [s["txt"].decode() for s in raw] == ["from the table", "a tall one"]
    metas = [json.loads(s["json"]) for s in raw]
    assert [(m["source"], m["score"]) for m in metas] == [("b.jpg", "0.5"), ("sub/d.jpeg", "0.9")]
    assert json.loads((out / "sizes.json").read_text()) == {"x-000000.tar": 2}


def test_from_folder_names_a_missing_column(tmp_path, capsys):
    src = make_folder(tmp_path)
    table = tmp_path / "captions.csv"
    table.write_text("path,text\nb.jpg,hello\n")
    assert main(["from-folder", str(src), str(tmp_path / "out"), "--captions-csv", str(table)]) == 2
    err = capsys.readouterr().err
    assert "no column 'caption'" in err and "--caption-col" in err and str(table) in err


def test_interrupted_from_folder_leaves_no_shard_under_a_final_name(tmp_path, monkeypatch):
    src, out = make_folder(tmp_path), tmp_path / "out"
    real_header, calls = folder._header, []

    def interrupt_on_third(data: bytes, suffix: str):
        calls.append(suffix)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_header(data, suffix)

    monkeypatch.setattr(folder, "_header", interrupt_on_third)
    with pytest.raises(KeyboardInterrupt):
        main(["from-folder", str(src), str(out), "--samples-per-shard", "1"])
    assert list(out.iterdir()) == []  # no shard, no sizes.json, no temp folder


def sample(key: str, size: tuple[int, int] = (16, 8), fmt: str = "jpg", **members) -> dict:
    image = Image.new("RGB", size, (200, 30, 30))
    data = jpeg_bytes(image) if fmt == "jpg" else png_bytes(image)
    return {"__key__": key, fmt: data, "txt": f"caption of {key}", **members}


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_inspect_reports_counts_members_sizes_and_captions(tmp_path, capsys):
    samples = [
        sample("0", (16, 8), json=json.dumps({"original_width": 300, "original_height": 100})),
        sample("1", (100, 100), fmt="png"),  # size from the PNG header
        sample("2", (8, 70), txt="one two three four five six"),
        sample("3", (20, 20), txt=""),
    ]
    write_shards(samples, str(tmp_path / "s-%06d.tar"), maxcount=3)
    assert main(["inspect", str(tmp_path), "--json", "--write-sizes"]) == 0
    stats = json.loads(capsys.readouterr().out)

    assert (stats["shards"], stats["samples"], stats["samples_inspected"]) == (2, 4, 4)
    assert stats["members"] == {"jpg": 3, "txt": 4, "json": 1, "png": 1}
    assert stats["width"]["256-511"] == 1 and stats["width"]["64-127"] == 1
    assert stats["width"]["<64"] == 2 and sum(stats["width"].values()) == 4
    assert stats["height"] == {**dict.fromkeys(stats["height"], 0), "64-127": 3, "<64": 1}
    assert stats["aspect_ratio"][">=2"] == 1 and stats["aspect_ratio"]["0.9-1.1"] == 2
    assert stats["aspect_ratio"]["<0.5"] == 1
    words = stats["caption_words"]
    assert words["missing"] == 1 and words["histogram"]["0"] == 1
    assert words["histogram"]["1-4"] == 2 and words["histogram"]["5-9"] == 1
    assert words["percentiles"]["p50"] == 3 and words["percentiles"]["p100"] == 6
    assert {e["key"] for e in stats["examples"]} == {"0", "1", "2"}
    assert json.loads((tmp_path / "sizes.json").read_text()) == {
        "s-000000.tar": 3,
        "s-000001.tar": 1,
    }

    # Statistics of the first sample only; every shard still counted.
    assert main(["inspect", str(tmp_path / "s-{000000..000001}.tar"), "--samples", "1"]) == 0
    text = capsys.readouterr().out
    assert "2 shards, 4 samples (statistics of the first 1)" in text


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height and which holds no pixels at all."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_validate_finds_exactly_the_injected_bad_samples(tmp_path, capsys):
    good = [sample(f"good{i}") for i in range(4)]
    corrupt = sample("corrupt")
    corrupt["jpg"] = corrupt["jpg"][: len(corrupt["jpg"]) // 2]
    bad = [
        corrupt,
        sample("zero", jpg=b""),
        {k: v for k, v in sample("nocaption").items() if k != "txt"},
        {"__key__": "bomb", "png": png_header_only(30_000, 30_000), "txt": "decompression bomb"},
        sample("big", (80, 80), fmt="png"),  # over --max-pixels
        sample("badjson", json=b"{not json"),
    ]
    shards = write_shards([*good[:2], *bad, *good[2:]], str(tmp_path / "b-%06d.tar"), maxcount=4)
    report = tmp_path / "bad.jsonl"
    args = ["validate", str(tmp_path), "--report", str(report), "--max-pixels", "4096"]
    assert main([*args, "--workers", "2"]) == 1

    problems = [json.loads(line) for line in report.read_text().splitlines()]
    assert {(p["key"], p["reason"]) for p in problems} == {
        ("corrupt", "decode_error"),
        ("zero", "empty_member"),
        ("nocaption", "missing_caption"),
        ("bomb", "too_large"),
        ("big", "too_large"),
        ("badjson", "bad_json"),
    }
    assert len(problems) == 6 and {p["shard"] for p in problems} <= set(shards)
    out = capsys.readouterr().out
    assert "checked 10 samples in 3 shards: 6 bad samples" in out
    assert "too_large        2" in out

    clean = tmp_path / "clean"
    clean.mkdir()
    write_shards(good, str(clean / "c-%06d.tar"), maxcount=2)
    assert main(["validate", str(clean), "--report", str(tmp_path / "none.jsonl")]) == 0
    assert (tmp_path / "none.jsonl").read_text() == ""


def test_validate_reports_a_truncated_shard(tmp_path):
    shard = write_shards([sample(f"{i}") for i in range(6)], str(tmp_path / "t-%06d.tar"), 10)[0]
    data = Path(shard).read_bytes()
    Path(shard).write_bytes(data[: len(data) // 2])
    report = tmp_path / "bad.jsonl"
    assert main(["validate", shard, "--report", str(report)]) == 1
    reasons = [json.loads(line)["reason"] for line in report.read_text().splitlines()]
    assert "tar_error" in reasons
