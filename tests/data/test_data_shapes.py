"""Shapes demo vocabulary, renderer, checker, shard writer and the ldm-data CLI."""

from __future__ import annotations

import io
import json
import tarfile
from itertools import product
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from data.shapes import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    ShapeSpec,
    all_specs,
    heldout_specs,
    parse_caption,
    predict,
    render,
    score_image,
    score_many,
    train_specs,
)
from data.shards import ensure_demo_shards, write_demo_shards
from train.cli import data as cli


def _rgb_dist(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    return float(np.linalg.norm(np.subtract(a, b)))


def test_vocabulary_is_well_separated() -> None:
    assert set(COLOURS) == {"red", "green", "blue", "yellow", "magenta", "cyan"}
    assert set(BACKGROUNDS) == {"white", "black", "gray"}
    assert SHAPES == ("circle", "square", "triangle")
    assert POSITIONS["top right"] == (0.73, 0.27)
    assert min(_rgb_dist(c, b) for c, b in product(COLOURS.values(), BACKGROUNDS.values())) > 100
    pairs = [(a, b) for a, b in product(COLOURS.values(), repeat=2) if a != b]
    assert min(_rgb_dist(a, b) for a, b in pairs) > 80


def test_caption_round_trip() -> None:
    spec = ShapeSpec("red", "circle", "top left", "white")
    assert spec.caption == "a red circle at the top left on a white background"
    centre = ShapeSpec("blue", "triangle", "center", "gray")
    assert centre.caption == "a blue triangle in the center on a gray background"
    specs = all_specs()
    assert len(specs) == 270 and len(set(specs)) == 270
    assert all(parse_caption(s.caption) == s for s in specs)
    with pytest.raises(ValueError, match="a pink circle"):
        parse_caption("a pink circle at the top left on a white background")


def test_heldout_split() -> None:
    held, train = heldout_specs(), train_specs()
    assert len(held) == 27 and len(train) == 243
    assert not set(held) & set(train)
    assert set(held) | set(train) == set(all_specs())
    assert {s.colour for s in train} == set(COLOURS)
    assert {s.shape for s in train} == set(SHAPES)
    assert {s.position for s in train} == set(POSITIONS)
    assert {s.background for s in train} == set(BACKGROUNDS)
    assert heldout_specs() == held  # deterministic
    assert heldout_specs(seed=1) != held


def test_render_draws_the_spec() -> None:
    spec = ShapeSpec("green", "square", "center", "black")
    image = render(spec, 64, np.random.default_rng(0))
    assert image.size == (64, 64) and image.mode == "RGB"
    arr = np.asarray(image)
    assert tuple(arr[0, 0]) == BACKGROUNDS["black"]
    assert tuple(arr[32, 32]) == COLOURS["green"]


@pytest.mark.parametrize("size", [32, 64])
def test_checker_accuracy_on_rendered_images(size: int) -> None:
    rng = np.random.default_rng(size)
    specs = all_specs()
    acc = score_many([render(s, size, rng) for s in specs], specs)
    assert acc["colour"] >= 0.99
    assert acc["position"] >= 0.99
    assert acc["shape"] >= 0.95
    assert acc["background"] >= 0.99


@pytest.mark.parametrize("radius", [0.7, 1.0, 1.5])
def test_checker_reads_blurred_shapes(radius: float) -> None:
    # A blurred apex fills the triangle's box like a circle (ratio 0.5 -> ~0.75): the fill ratio
    # alone read every triangle here as a circle (shape 67 % at radius 1), as it did a trained
    # VAE's reconstructions.
    rng = np.random.default_rng(7)
    specs = all_specs()
    images = [render(s, 32, rng).filter(ImageFilter.GaussianBlur(radius)) for s in specs]
    assert score_many(images, specs)["shape"] == 1.0
    # Blur does not make the other shapes asymmetric: nothing else turns into a triangle.
    others = [img for img, s in zip(images, specs, strict=True) if s.shape != "triangle"]
    assert "triangle" not in {predict(img)["shape"] for img in others}


def test_checker_rejects_wrong_attributes() -> None:
    spec = ShapeSpec("red", "triangle", "bottom right", "white")
    image = render(spec, 32, np.random.default_rng(0))
    assert score_image(image, spec) == {
        "colour": True,
        "position": True,
        "shape": True,
        "background": True,
    }
    wrong = ShapeSpec("blue", "circle", "top left", "white")
    assert score_image(image, wrong) == {
        "colour": False,
        "position": False,
        "shape": False,
        "background": True,
    }
    blank = Image.new("RGB", (32, 32), BACKGROUNDS["gray"])
    assert not any(score_image(blank, spec).values())
    assert predict(blank) == {
        "colour": None,
        "position": None,
        "shape": None,
        "background": "gray",
    }


def test_checker_accepts_model_tensors() -> None:
    spec = ShapeSpec("cyan", "circle", "top right", "black")
    image = render(spec, 32, np.random.default_rng(3))
    chw = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 127.5 - 1.0
    assert predict(chw.numpy()) == predict(image)
    assert predict(chw.numpy())["colour"] == "cyan"


def test_score_many_averages() -> None:
    a = ShapeSpec("red", "square", "center", "white")
    b = ShapeSpec("yellow", "square", "center", "black")
    rng = np.random.default_rng(0)
    images = [render(a, 32, rng), render(a, 32, rng)]  # the second is scored against b
    acc = score_many(images, [a, b])
    assert acc == {
        "colour": 0.5,
        "position": 1.0,
        "shape": 1.0,
        "background": 0.5,
        "all": 0.5,
    }


def _members(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


def test_write_demo_shards_layout(tmp_path: Path) -> None:
    manifest = write_demo_shards(tmp_path / "a", num_samples=25, samples_per_shard=10, size=32)
    assert manifest["shards"] == [f"shapes-00000{i}.tar" for i in range(3)]
    assert manifest["pattern"] == "shapes-{000000..000002}.tar"
    assert manifest["num_samples"] == 25 and manifest["size"] == 32
    assert json.loads((tmp_path / "a" / "manifest.json").read_text()) == manifest
    names = _members(tmp_path / "a" / "shapes-000001.tar")
    assert names[:3] == ["000010000.jpg", "000010000.json", "000010000.txt"]
    assert len(names) == 30
    held = set(json.loads((tmp_path / "a" / "heldout.json").read_text()))
    assert held == {s.caption for s in heldout_specs()}
    with tarfile.open(tmp_path / "a" / "shapes-000002.tar") as tar:
        assert tar.getnames()[-1] == "000020004.txt"
        caption = tar.extractfile("000020004.txt").read().decode()
        meta = json.loads(tar.extractfile("000020004.json").read())
        jpg = tar.extractfile("000020004.jpg").read()
    spec = parse_caption(caption)
    assert caption not in held
    assert meta == {
        "caption": caption,
        "width": 32,
        "height": 32,
        "colour": spec.colour,
        "shape": spec.shape,
        "position": spec.position,
        "background": spec.background,
    }
    assert all(score_image(Image.open(io.BytesIO(jpg)), spec).values())
    write_demo_shards(tmp_path / "b", num_samples=25, samples_per_shard=10, size=32)
    for name in manifest["shards"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_ensure_demo_shards_is_idempotent(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    kw = {"num_samples": 8, "samples_per_shard": 4, "size": 16}
    assert ensure_demo_shards(out, **kw) == out
    stamp = (out / "manifest.json").stat().st_mtime_ns
    ensure_demo_shards(out, **kw)
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # no temp dir left behind
    half = tmp_path / "half"
    half.mkdir()
    (half / "shapes-000000.tar").write_bytes(b"")
    with pytest.raises(FileExistsError, match="manifest.json"):
        ensure_demo_shards(half, **kw)


def test_cli_demo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    args = ["demo", str(out), "--num-samples", "6", "--samples-per-shard", "3", "--size", "16"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert f"{out}/shapes-{{000000..000001}}.tar" in printed
    assert cli.main(args) == 0
    assert "exists" in capsys.readouterr().out
    assert cli.main(["heldout", str(out)]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 27
