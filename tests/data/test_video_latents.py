"""Precomputed clip latents (`ldm-data encode` over video shards) for both video families: a
causal video VAE encodes each clip whole (Wan: [2C, F', h, w] with F' = 1 + (F - 1) / 4), a 2D
VAE frame by frame (AnimateDiff: [2C, F, h, w]); training from them gives the online loss, and
encoded shards of the other kind (image latents under a video config, clip latents under an
image one) or an image-to-video model over latents are refused before a start."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from train.cli.data import main as ldm_data
from train.config.compose import compose
from train.errors import ConfigError
from train.tasks.rng import SampleRNG

ONLINE = ("data.shuffle_buffer=0", "data.video.random_start=false", "model.caption_dropout=0.5")
# family: (experiment, the VAE preset that loads a folder, its subfolder, moments of one clip)
FAMILIES = {
    "wan": ("wan_tiny", "wan", "vae", (32, 2, 4, 4)),  # 5 frames at 32 px -> 2 latent frames
    "motion": ("motion_tiny", "pretrained", None, (8, 5, 8, 8)),  # per frame, 16 px -> 8
}


@pytest.fixture(scope="module")
def wan_clips(tmp_path_factory) -> Path:
    from data.shards_video import write_motion_demo_shards

    out = tmp_path_factory.mktemp("wan_clips")
    write_motion_demo_shards(out, num_samples=16, samples_per_shard=8, size=32, frames=5, seed=3)
    return out


def encode(root: Path, family: str, shards: Path) -> tuple[list[str], Path]:
    experiment, preset, subfolder, _ = FAMILIES[family]
    base = [f"paths.root={root}", f"experiment={experiment}", "logger=none", f"data.urls={shards}"]
    vae_dir = root / "vae_folder"
    torch.manual_seed(0)  # a trained VAE stand-in: saved once, loaded by encoder and trainer
    instantiate(compose(base).model.vae).save_pretrained(vae_dir / (subfolder or ""))
    overrides = [*base, f"model/vae={preset}", f"model.vae.pretrained_model_name_or_path={vae_dir}"]
    out = root / "encoded"
    args = ["encode", str(out), *overrides, "--dtype", "float32", "--batch-size", "4"]
    assert ldm_data(args) == 0
    return overrides, out


@pytest.fixture(scope="module")
def wan_encoded(tmp_path_factory, wan_clips) -> tuple[str, list[str], Path]:
    return "wan", *encode(tmp_path_factory.mktemp("wan_latents"), "wan", wan_clips)


@pytest.fixture(scope="module")
def motion_encoded(tmp_path_factory, motion_shards) -> tuple[str, list[str], Path]:
    return "motion", *encode(tmp_path_factory.mktemp("motion_latents"), "motion", motion_shards)


@pytest.fixture(params=sorted(FAMILIES))
def encoded(request) -> tuple[str, list[str], Path]:
    return request.getfixturevalue(f"{request.param}_encoded")


def test_clip_latents_are_written_per_sample_with_their_frames(encoded) -> None:
    family, overrides, out = encoded
    cfg = compose(overrides)
    with tarfile.open(sorted(out.glob("*.tar"))[0]) as tar:
        members = {m.name.split(".", 1)[1]: tar.extractfile(m).read() for m in tar}
    moments = np.load(io.BytesIO(members["latent.npy"]), allow_pickle=False)
    assert moments.shape == FAMILIES[family][3]
    meta = json.loads(members["json"])
    assert meta["clip_frames"] == cfg.data.video.num_frames and meta["clip_fps"] == 8.0


def test_training_from_clip_latents_gives_the_online_loss(encoded) -> None:
    _, overrides, out = encoded
    cfg = compose([*overrides, *ONLINE])
    online = next(iter(instantiate(cfg.data).train_dataloader()))
    latent = next(iter(instantiate(cfg.data, urls=str(out), latents=True).train_dataloader()))
    assert latent["key"] == online["key"] and "pixel_values" not in latent
    module = instantiate(cfg.model).train()
    losses = [module.diffusion_step(b, SampleRNG.for_rows(1, 0, 0, len(b["key"]), "cpu"))
              for b in (online, latent)]  # fmt: skip
    assert torch.isfinite(losses[0])
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)


def _image_latent_shard(folder: Path) -> Path:
    """An encoded shard of image latents [2C, h, w], as `ldm-data encode` writes for images."""
    import webdataset as wds

    def npy(shape: tuple[int, ...]) -> bytes:
        buf = io.BytesIO()
        np.save(buf, np.zeros(shape, np.float32), allow_pickle=False)
        return buf.getvalue()

    folder.mkdir()
    with wds.TarWriter(str(folder / "000000.tar")) as sink:
        for i in range(2):
            sink.write({"__key__": f"{i:04d}", "latent.npy": npy((32, 4, 4)),
                        "emb.npy": npy((8, 384)), "txt": b"a red circle"})  # fmt: skip
    return folder


def test_encoded_shards_of_the_other_kind_are_refused(wan_encoded, tmp_path) -> None:
    from train.config.checks import early_checks

    _, overrides, out = wan_encoded
    images = _image_latent_shard(tmp_path / "image_latents")
    cfg = compose([*overrides, f"data.urls={images}", "data.latents=true"])
    with pytest.raises(ConfigError, match=re.escape("holds image latents (0000.latent.npy: "
                                                    "[2C, h, w] = [32, 4, 4]) but data.video is "
                                                    "set")):  # fmt: skip
        early_checks(cfg, run_dir=False)
    cfg = compose([f"paths.root={tmp_path}", "experiment=tiny", f"data.urls={out}",
                   "data.latents=true"])  # fmt: skip
    with pytest.raises(ConfigError, match=re.escape("holds clip latents")):
        early_checks(cfg, run_dir=False)


def test_image_to_video_over_latents_is_refused(wan_encoded) -> None:
    from train.config.checks import early_checks

    _, overrides, out = wan_encoded
    cfg = compose([*overrides, "model/backbone=wan_i2v_tiny", f"data.urls={out}",
                   "data.latents=true"])  # fmt: skip
    with pytest.raises(ConfigError, match="encoded shards hold no images"):
        early_checks(cfg, run_dir=False)


def _moments_by_key(folder: Path) -> dict[str, np.ndarray]:
    found = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar:
                if m.name.endswith(".latent.npy"):
                    found[m.name.split(".", 1)[0]] = np.load(io.BytesIO(tar.extractfile(m).read()))
    return found


def test_tiled_encoding_writes_what_the_tiled_vae_encodes(wan_encoded) -> None:
    from train.models.parts import posterior_of

    _, overrides, out = wan_encoded
    tiling = ["model/vae_tiling=tiles", "model.vae_tiling.tile=24"]  # 2 x 2 tiles, 16 px apart
    tiled = out.parent / "tiled"
    args = ["encode", str(tiled), *overrides, *tiling, "--dtype", "float32", "--batch-size", "4"]
    assert ldm_data(args) == 0
    cfg = compose([*overrides, *ONLINE, *tiling])
    batch = next(iter(instantiate(cfg.data).train_dataloader()))
    vae = instantiate(cfg.model.vae_tiling).apply(instantiate(cfg.model.vae))
    with torch.no_grad():
        expected = posterior_of(vae, batch["pixel_values"]).parameters.numpy()
    written, whole = _moments_by_key(tiled), _moments_by_key(out)
    for key, moments in zip(batch["key"], expected, strict=True):
        np.testing.assert_allclose(written[key], moments, rtol=1e-4, atol=1e-5)
        assert written[key].shape == whole[key].shape and not np.allclose(written[key], whole[key])
