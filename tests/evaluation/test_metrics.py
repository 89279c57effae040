"""FID, KID and CLIP score on the shapes set with tiny offline feature nets, and the reference
statistics that stand for the real images: computed once, refused for another set."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cli_runner import run_cli

from data.evalset import iter_eval_samples, set_fingerprint
from data.shards import write_demo_shards
from train.cli.data import main as data_main
from train.errors import ConfigError
from train.evaluation.features import ClipImageFeatures, TorchScriptInception
from train.evaluation.metrics import ImageMetrics
from train.evaluation.reference import compute_reference, images_to_uint8, load_reference


def real_images(shards: Path) -> tuple[torch.Tensor, list[str]]:
    samples = list(iter_eval_samples(set_fingerprint(str(shards))[1], resolution=32))
    return images_to_uint8([s.image for s in samples]), [s.caption for s in samples]


@pytest.fixture(scope="module")
def clip_reference(demo_shards: Path, tiny_clip_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "val.safetensors"
    compute_reference(str(demo_shards), ClipImageFeatures(str(tiny_clip_dir)), out, 32)
    return out


def scores(feature, reference: Path, shards: Path, images: torch.Tensor, prompts=None, clip=None):
    metrics = ImageMetrics(feature, load_reference(reference, str(shards), feature), clip)
    for i in range(0, len(images), 16):  # in batches, as generation hands them over
        metrics.update(images[i : i + 16], None if prompts is None else prompts[i : i + 16])
    return metrics.compute()


def test_real_against_itself_is_near_zero_and_against_noise_far(
    demo_shards: Path, tiny_clip_dir: Path, clip_reference: Path
) -> None:
    feature = ClipImageFeatures(str(tiny_clip_dir))
    images, _ = real_images(demo_shards)
    assert images.shape == (64, 3, 32, 32)
    same = scores(feature, clip_reference, demo_shards, images)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, images.shape, dtype=torch.uint8, generator=gen)
    far = scores(feature, clip_reference, demo_shards, noise)
    print(f"FID same {same['fid']:.3g} noise {far['fid']:.3g}; KID same {same['kid']:.3g} "
          f"noise {far['kid']:.3g}")  # fmt: skip
    # Seen here: FID 2.5e-13 vs 3.1. KID's unbiased estimate is not 0 for a set against itself
    # (the same images are no independent draws): -0.072 vs 0.36 for noise.
    assert abs(same["fid"]) < 1e-6 and far["fid"] > 1.0
    assert far["kid"] > 3 * abs(same["kid"]) and far["kid"] > 0.1

    # One ImageMetrics serves every evaluation of a run: reset() forgets the generated side only.
    metrics = ImageMetrics(feature, load_reference(clip_reference, str(demo_shards), feature))
    for batch in noise.split(16):  # in the batches `scores` used: the same float rounding
        metrics.update(batch)
    first = metrics.compute()
    metrics.reset()
    for batch in images.split(16):
        metrics.update(batch)
    assert metrics.compute() == pytest.approx(same) and first == pytest.approx(far)


def embedding(out) -> torch.Tensor:
    """Unit CLIP embeddings from get_*_features (a tensor, or an output holding it)."""
    out = out if isinstance(out, torch.Tensor) else out.pooler_output
    return torch.nn.functional.normalize(out, dim=-1)


def test_clip_score_is_torchmetrics_formula_on_the_saved_clip(
    demo_shards: Path, tiny_clip_dir: Path, clip_reference: Path
) -> None:
    """100 x the cosine of image and caption embeddings, averaged (then floored at 0)."""
    from transformers import CLIPModel, CLIPProcessor

    images, captions = real_images(demo_shards)
    feature = ClipImageFeatures(str(tiny_clip_dir))
    reference = load_reference(clip_reference, str(demo_shards), feature)
    metrics = ImageMetrics(feature, reference, clip_model=str(tiny_clip_dir))
    metrics.update(images[:40], captions[:40])
    metrics.update(images[40:], captions[40:])
    got = metrics.compute()
    model = CLIPModel.from_pretrained(tiny_clip_dir)
    proc = CLIPProcessor.from_pretrained(tiny_clip_dir)
    with torch.no_grad():
        batch = proc(text=captions, images=list(images), return_tensors="pt", padding=True)
        img = embedding(model.get_image_features(pixel_values=batch["pixel_values"]))
        txt = embedding(model.get_text_features(batch["input_ids"], batch["attention_mask"]))
    mean = (100 * (img * txt).sum(-1)).mean().item()
    # The random tiny CLIP's cosines are near 0 and of either sign: compare before the floor.
    unfloored = (metrics.clip.score / metrics.clip.n_samples).item()
    assert unfloored == pytest.approx(mean, rel=1e-4, abs=1e-4) and abs(mean) > 1e-3
    assert got["clip_score"] == pytest.approx(max(mean, 0.0), rel=1e-4, abs=1e-4)


def test_the_inception_torchscript_path_loads_a_saved_file(
    demo_shards: Path, tiny_inception_file: Path, tmp_path: Path
) -> None:
    feature = TorchScriptInception(str(tiny_inception_file))
    ref = tmp_path / "ref.safetensors"
    meta = compute_reference(str(demo_shards), feature, ref, 32)
    assert meta["feature"] == "inception-torchscript:inception-tiny.pt"
    assert load_reference(ref, str(demo_shards), feature).shape == (64, 12)
    images, _ = real_images(demo_shards)
    assert abs(scores(feature, ref, demo_shards, images)["fid"]) < 1e-3


def test_reference_of_another_set_or_extractor_is_refused(
    demo_shards: Path, tiny_clip_dir: Path, tiny_inception_file: Path, clip_reference: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    other = tmp_path / "other"
    write_demo_shards(other, num_samples=32, samples_per_shard=32, size=32, seed=2)
    feature = ClipImageFeatures(str(tiny_clip_dir))
    with pytest.raises(ConfigError, match="belong to another set .*recompute with `ldm-data st"):
        load_reference(clip_reference, str(other), feature)
    inception = TorchScriptInception(str(tiny_inception_file))
    with pytest.raises(ConfigError, match="with feature extractor 'clip:.*inception-torchscript"):
        load_reference(clip_reference, str(demo_shards), inception)


def test_ldm_data_stats_writes_the_reference_and_names_a_missing_extractor(
    demo_shards: Path, tiny_clip_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "stats" / "val.safetensors"
    ok = run_cli(data_main, ["ldm-data", "stats", str(demo_shards), str(out),
                             "--clip-model", str(tiny_clip_dir), "--resolution", "32"])  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "wrote" in ok.stdout and "64 images of 64" in ok.stdout
    feats = load_reference(out, str(demo_shards), ClipImageFeatures(str(tiny_clip_dir)))
    assert feats.shape == (64, 16) and feats.std() > 0
    for flag, path in (("--inception", tmp_path / "nope.pt"), ("--clip-model", tmp_path / "nope")):
        bad = run_cli(data_main, ["ldm-data", "stats", str(demo_shards), str(tmp_path / "x"),
                                  flag, str(path)])  # fmt: skip
        assert bad.returncode == 2, bad.stderr
        assert str(path) in bad.stderr and "does not exist" in bad.stderr
        assert not (tmp_path / "x").exists()
