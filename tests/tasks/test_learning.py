"""The models learn: a few optimizer steps lower the loss on a fixed batch, and stage 1's export
carries the latent scale that stage 2 relies on."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL
from hydra.utils import instantiate

from train.tasks.rng import SampleRNG

STEPS = 12  # the loss falls to well under half of its start within ~10 steps on CPU
# tiny sets model.backbone.model.*, which the autoencoder has no place for
AE_OVERRIDES = ("experiment=tiny", "model=autoencoder", "~model.backbone")


def optimizer_and_schedule(module):
    """What Lightning would step: the module's own optimizer and per-step LR schedule."""
    conf = module.configure_optimizers()
    if isinstance(conf, dict):
        return conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    return conf, None


def first_batch(cfg) -> dict:
    """One real batch from the data module the config builds (decoded, resized, tokenized)."""
    datamodule = instantiate(cfg.data)
    return next(iter(datamodule.train_dataloader()))


def train_steps(module, loss_fn, steps: int = STEPS) -> list[float]:
    optimizer, schedule = optimizer_and_schedule(module)
    module.train()
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if schedule is not None:
            schedule.step()
        losses.append(loss.item())
    return losses


def test_seeded_diffusion_step_is_reproducible(compose, demo_shards):
    """Per-sample generators fix everything random in a step (latent sample, noise, timesteps),
    which makes validation loss comparable across steps and training independent of how the
    global batch is split over devices."""
    cfg = compose("experiment=tiny", f"data.urls={demo_shards}")
    module = instantiate(cfg.model).eval()
    batch = first_batch(cfg)
    with torch.no_grad():
        n = len(batch["key"])
        a = module.diffusion_step(batch, SampleRNG.for_rows(0, 0, 0, n, "cpu"))
        torch.rand(100)  # the global RNG moving on must not matter
        b = module.diffusion_step(batch, SampleRNG.for_rows(0, 0, 0, n, "cpu"))
        c = module.diffusion_step(batch, SampleRNG.for_rows(0, 1, 0, n, "cpu"))
    assert a.item() == b.item()
    assert a.item() != c.item()


def test_diffusion_loss_drops_on_a_fixed_batch(compose, demo_shards):
    cfg = compose("experiment=tiny", f"data.urls={demo_shards}")
    torch.manual_seed(0)
    module = instantiate(cfg.model)
    module.caption_dropout = 0.0  # every step must see the same conditioning
    batch = first_batch(cfg)
    assert batch["pixel_values"].shape == (cfg.data.batch_size, 3, 16, 16)
    vae_before = {k: v.clone() for k, v in module.vae.state_dict().items()}
    text_before = {k: v.clone() for k, v in module.conditioner.state_dict().items()}

    def loss_fn():
        # Fresh generators with the same seeds: the same noise and timesteps every step.
        return module.diffusion_step(batch, SampleRNG.for_rows(0, 0, 0, len(batch["key"]), "cpu"))

    losses = train_steps(module, loss_fn)
    with torch.no_grad():
        final = loss_fn().item()
    assert final < 0.7 * losses[0], losses + [final]
    # Only the UNet learns: the frozen VAE and text encoder come out exactly as they went in.
    for name, value in module.vae.state_dict().items():
        assert torch.equal(value, vae_before[name]), name
    for name, value in module.conditioner.state_dict().items():
        assert torch.equal(value, text_before[name]), name


def test_autoencoder_reconstruction_loss_drops(compose, demo_shards):
    cfg = compose(*AE_OVERRIDES, f"data.urls={demo_shards}")
    torch.manual_seed(0)
    module = instantiate(cfg.model)
    assert type(module).__name__ == "AutoencoderTraining"
    batch = first_batch(cfg)
    assert "input_ids" not in batch  # image-only stage: the data module skips tokenization
    pixels = batch["pixel_values"]

    def loss_fn():
        torch.manual_seed(0)  # the same posterior sample every step
        return module.autoencoder_loss(pixels)[0]

    losses = train_steps(module, loss_fn)
    with torch.no_grad():
        torch.manual_seed(0)
        final_rec = module.autoencoder_loss(pixels)[1]["rec"].item()
    assert final_rec < 0.7 * losses[0], losses + [final_rec]


def test_autoencoder_export_sets_scaling_factor_to_one_over_latent_std(compose, tmp_path):
    cfg = compose(*AE_OVERRIDES)
    torch.manual_seed(0)
    module = instantiate(cfg.model)
    with pytest.raises(RuntimeError, match="train before export"):
        module.export(tmp_path / "untrained")

    pixels = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        torch.manual_seed(0)
        z = module.vae.encode(pixels).latent_dist.sample()
        module.train()
        torch.manual_seed(0)
        module.autoencoder_loss(pixels)  # the first step measures the std of exactly this z
    expected_std = z.std(unbiased=False).item()
    assert module.latent_std == pytest.approx(expected_std, rel=1e-4)

    out = module.export(tmp_path / "vae")
    written = json.loads((out / "config.json").read_text())["scaling_factor"]
    assert written == pytest.approx(1.0 / expected_std, rel=1e-4)
    assert list(out.glob("*.safetensors")) and not list(out.glob("*.bin"))

    loaded = AutoencoderKL.from_pretrained(out)
    assert loaded.config.scaling_factor == pytest.approx(written, rel=1e-6)
    saved = module.vae.state_dict()
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, saved[name]), name


def test_autoencoder_starts_near_deterministic() -> None:
    from diffusers import AutoencoderKL

    from train.tasks.autoencoder import start_near_deterministic

    torch.manual_seed(0)
    kw = {"block_out_channels": [16], "norm_num_groups": 16}
    vae = AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"], up_block_types=["UpDecoderBlock2D"], **kw
    )
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    before = vae.encode(x).latent_dist.std.mean()
    start_near_deterministic(vae, -6.0)
    after = vae.encode(x).latent_dist.std.mean()
    assert before > 0.5 and 0.02 < after < 0.1  # exp(-6 / 2) = 0.05
