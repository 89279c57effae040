"""Precomputed latents and embeddings (`ldm-data encode`) train exactly like online encoding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from train.cli.data import main as ldm_data
from train.cli.run import run
from train.config.compose import compose
from train.tasks.rng import SampleRNG

ENCODE_ARGS = ("--dtype", "float32", "--batch-size", "8")


def encode(
    root: Path, demo_shards: Path, experiment: str, *extra: str
) -> tuple[list, Path]:
    tiny = compose([f"paths.root={root}", f"experiment={experiment}", f"data.urls={demo_shards}"])
    vae_dir = root / "vae"
    torch.manual_seed(0)
    instantiate(tiny.model.vae).save_pretrained(vae_dir)
    overrides = [
        f"paths.root={root}",
        f"experiment={experiment}",
        f"data.urls={demo_shards}",
        "model/vae=pretrained",
        f"model.vae.pretrained_model_name_or_path={vae_dir}",
        "logger=none",
        *extra,
    ]
    out = root / "encoded"
    assert ldm_data(["encode", str(out), *overrides, *ENCODE_ARGS]) == 0
    return overrides, out


@pytest.fixture(scope="module")
def encoded(tmp_path_factory: pytest.TempPathFactory, demo_shards: Path) -> tuple[list, Path]:
    return encode(tmp_path_factory.mktemp("latents"), demo_shards, "tiny")


def _first_batch(datamodule) -> dict:
    return next(iter(datamodule.train_dataloader()))


def test_encoded_shards_layout(encoded: tuple[list, Path], demo_shards: Path) -> None:
    _, out = encoded
    names = sorted(p.name for p in demo_shards.glob("*.tar"))
    assert sorted(p.name for p in out.glob("*.tar")) == names
    assert json.loads((out / "sizes.json").read_text()) == {n: 32 for n in names}
    assert not list(out.glob(".*.tmp"))
    # A rerun skips the finished shards (resumable) and leaves them as they were.
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    overrides, _ = encoded
    assert ldm_data(["encode", str(out), *overrides]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == before
    # Counts of shards an earlier run finished come from sizes.json, those just written from the
    # encoder: the same numbers either way.
    (out / names[0]).unlink()
    assert ldm_data(["encode", str(out), *overrides, *ENCODE_ARGS]) == 0
    assert json.loads((out / "sizes.json").read_text()) == {n: 32 for n in names}


@pytest.mark.parametrize("training", [False, True])
def test_latent_loss_equals_online_loss(encoded: tuple[list, Path], training: bool) -> None:
    overrides, out = encoded
    cfg = compose([*overrides, "data.shuffle_buffer=0", "model.caption_dropout=0.5"])
    online = _first_batch(instantiate(cfg.data))
    latent = _first_batch(instantiate(cfg.data, urls=str(out), latents=True))
    assert latent["key"] == online["key"]
    assert "pixel_values" not in latent and "input_ids" not in latent
    assert latent["latent_moments"].shape == (4, 8, 8, 8)  # [B, 2C, h, w]: 16 px, 2x down
    module = instantiate(cfg.model).train(training)
    losses = []
    for batch in (online, latent):
        rng = SampleRNG.for_rows(1, 0, 0, len(batch["key"]), "cpu")  # caption dropout too
        losses.append(module.diffusion_step(batch, rng))
    assert torch.isfinite(losses[0])
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)


def test_sdxl_latents_carry_pooled_embeddings_and_sizes(
    tmp_path_factory: pytest.TempPathFactory, demo_shards: Path
) -> None:
    """Two encoders' hidden states, the pooled embedding and the micro-conditioning sizes
    (cropped at encode time) come back from the shards: the loss equals online encoding's."""
    root = tmp_path_factory.mktemp("sdxl")
    torch.manual_seed(0)  # trained encoders stand-in: saved once, loaded by both sides
    node = compose(["experiment=sdxl_tiny"]).model.conditioner
    for name in ("text_encoder_1", "text_encoder_2", "tokenizer_1", "tokenizer_2"):
        folder = {"text_encoder_1": "text_encoder", "tokenizer_1": "tokenizer"}.get(name, name)
        instantiate(node[name]).save_pretrained(root / "text" / folder)
    overrides, out = encode(root, demo_shards, "sdxl_tiny", "model/conditioner=sdxl",
                            f"model.conditioner.text_encoder_1.pretrained_model_name_or_path="
                            f"{root / 'text'}")  # fmt: skip
    cfg = compose([*overrides, "data.shuffle_buffer=0", "model.caption_dropout=0.5"])
    online = _first_batch(instantiate(cfg.data))
    latent = _first_batch(instantiate(cfg.data, urls=str(out), latents=True))
    assert latent["pooled_embeds"].shape[0] == len(latent["key"])
    for key in ("original_size", "crop_top_left", "target_size"):
        assert torch.equal(latent[key], online[key]), key
    module = instantiate(cfg.model).train()
    losses = [module.diffusion_step(b, SampleRNG.for_rows(1, 0, 0, len(b["key"]), "cpu"))
              for b in (online, latent)]  # fmt: skip
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)


def test_training_from_latents_never_runs_the_encoders(
    encoded: tuple[list, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    overrides, out = encoded
    cfg = compose([*overrides, f"data.urls={out}", "data.latents=true", "trainer.max_steps=3"])

    def forbidden(*args, **kwargs):
        raise AssertionError("the VAE encoder ran during training from latents")

    from diffusers import AutoencoderKL

    monkeypatch.setattr(AutoencoderKL, "encode", forbidden)
    run(cfg)
    assert (Path(cfg.paths.run_dir) / "export" / "unet").is_dir()


def test_encode_refuses_a_random_vae(
    demo_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    args = ["encode", str(tmp_path / "o"), f"paths.root={tmp_path}", "experiment=tiny"]
    assert ldm_data([*args, f"data.urls={demo_shards}"]) == 2
    assert "model/vae=pretrained" in capsys.readouterr().err
    assert not list((tmp_path / "o").glob("*.tar"))
