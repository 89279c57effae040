"""The Flux family on CPU: the CLIP + T5 conditioner against the pipeline's encode_prompt, the
backbone (packing, position ids, t / 1000, guidance) against one step of the pipeline's sampler,
the export's dynamic-shift scheduler, a tiny run and its export in FluxPipeline, ldm-export of
its checkpoint, the pretrained presets on local folders, and the settings that cannot work."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli
from diffusers import DiffusionPipeline, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from hydra.errors import InstantiationException
from safetensors.torch import load_file
from transformers import AutoTokenizer

from train.cli.export import build_module, export_checkpoint
from train.cli.run import run
from train.cli.sample import call_kwargs, load_pipeline
from train.config.compose import compose
from train.distributed.sharding import load_any_checkpoint
from train.errors import ConfigError

FLUX = ("experiment=flux_tiny", "logger=none")
PROMPTS = ["a red circle at the top left", "a blue square " * 8, "", "Ünïcode ✓"]
MODELS = ("transformer", "vae", "text_encoder", "text_encoder_2")
TOKENIZERS = ("tokenizer", "tokenizer_2")
T5_LENGTH = 32  # model.conditioner.max_sequence_length of flux_tiny


def train(root: Path, shards: Path, *overrides: str):
    """`ldm-train experiment=flux_tiny` in the test process: (run_dir, cfg, what it printed)."""
    from train.cli.train import main

    args = [f"paths.root={root}", *FLUX, f"data.urls={shards}", *overrides]
    cfg = compose(args)
    proc = run_cli(main, ["ldm-train", *args])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return Path(cfg.paths.run_dir), cfg, proc


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(next(folder.glob("*.safetensors")))


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), what
    assert all(torch.equal(a[k], b[k]) for k in a), what


def assert_same_tokenizer(a: Path, b: Path) -> None:
    """Same settings and ids (tokenizer.json also holds the last call's padding state)."""
    config = "tokenizer_config.json"
    assert json.loads((a / config).read_text()) == json.loads((b / config).read_text()), a.name
    ta, tb = AutoTokenizer.from_pretrained(a), AutoTokenizer.from_pretrained(b)
    assert type(ta) is type(tb) and ta(PROMPTS).input_ids == tb(PROMPTS).input_ids, a.name


@pytest.fixture(scope="module")
def flux_run(tmp_path_factory, demo_shards):
    return train(tmp_path_factory.mktemp("flux_run"), demo_shards)


def test_conditioner_equals_the_pipelines_encode_prompt(compose):
    cfg = compose(*FLUX)
    module = build_module(cfg.model, cfg.seed)
    conditioner = module.conditioner
    sizes = (conditioner.hidden_size, conditioner.pooled_size, conditioner.max_length)
    assert sizes == (32, 32, 77)
    assert set(conditioner.pipeline_parts()) == {*MODELS[2:], *TOKENIZERS}
    pipe = module.pipeline()
    assert isinstance(pipe, FluxPipeline)
    hidden, pooled, text_ids = pipe.encode_prompt(PROMPTS, None, max_sequence_length=T5_LENGTH)
    cond = conditioner.encode({"caption": PROMPTS}, None)
    assert cond.hidden.shape == (4, T5_LENGTH, 32) and cond.pooled.shape == (4, 32)
    torch.testing.assert_close(cond.hidden, hidden, rtol=0, atol=1e-6)
    torch.testing.assert_close(cond.pooled, pooled, rtol=0, atol=1e-6)
    assert text_ids.shape == (T5_LENGTH, 3) and not text_ids.any()
    assert (hidden[0] - hidden[1]).abs().max() > 1e-3, "different prompts, different states"
    null = conditioner.null()  # caption dropout's empty prompt: the pipeline's "" prompt
    torch.testing.assert_close(null.hidden[0], hidden[2], rtol=0, atol=1e-6)
    dropped = conditioner.encode({"caption": PROMPTS}, torch.tensor([True, False, False, True]))
    assert torch.equal(dropped.hidden[0], null.hidden[0])
    assert torch.equal(dropped.pooled[3], null.pooled[0])
    assert torch.equal(dropped.hidden[1], cond.hidden[1])


@pytest.mark.parametrize("guidance_embeds", [True, False], ids=["dev", "schnell"])
def test_backbone_prediction_is_the_velocity_the_pipeline_steps_with(compose, guidance_embeds):
    """One Euler step of the pipeline from sigma 1 to 0 moves the packed latents by -v: the v
    it used is the backbone's (unpacked) prediction at t = 1000, guided as it trains."""
    cfg = compose(*FLUX, f"model.backbone.model.guidance_embeds={guidance_embeds}")
    module = build_module(cfg.model, cfg.seed).eval()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    packed = FluxPipeline._pack_latents(x, 2, 4, 8, 8)
    pipe = module.pipeline()
    with torch.no_grad():
        out = pipe(PROMPTS[:2], height=16, width=16, num_inference_steps=1,
                   guidance_scale=module.backbone.guidance, latents=packed.clone(),
                   output_type="latent",
                   **module.conditioner.pipeline_call_kwargs()).images  # fmt: skip
        cond = module.conditioner.encode({"caption": PROMPTS[:2]}, None)
        v = module.backbone(x, torch.full((2,), 1000.0), cond)
        other = module.backbone.predict(module.trainable, x, torch.full((2,), 1000.0), cond, 1.0)
    assert v.shape == x.shape
    torch.testing.assert_close(packed - out, FluxPipeline._pack_latents(v, 2, 4, 8, 8),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    # The guidance value reaches the model only when it embeds one.
    assert (v - other).abs().max() > 1e-6 if guidance_embeds else torch.equal(v, other)


def test_export_scheduler_shifts_by_the_image_token_count(compose):
    """FLUX.1-dev's dynamic shifting: the export's scheduler needs mu, which FluxPipeline
    computes from the image's token count (16 here: 8x8 latents in 2x2 patches)."""
    module = build_module(compose(*FLUX).model, 0)
    scheduler = module.pipeline().scheduler
    assert scheduler.config.use_dynamic_shifting
    with pytest.raises(ValueError, match="mu"):
        scheduler.set_timesteps(2)
    mu = calculate_shift(16, 256, 4096, 0.5, 1.15)
    scheduler.set_timesteps(sigmas=[1.0, 0.5], mu=mu)
    s = 0.5
    shifted = math.exp(mu) / (math.exp(mu) + (1 / s - 1))
    assert scheduler.sigmas[1].item() == pytest.approx(shifted, abs=1e-6)
    assert module.objective.shift == 1.0, "training levels unshifted, as diffusers' Flux script"


def test_tiny_run_trains_and_its_export_generates(flux_run):
    run_dir, cfg, proc = flux_run
    loss = re.search(r"Final train/loss: (\S+)", proc.stdout)
    assert loss and math.isfinite(float(loss.group(1))), proc.stdout
    export = run_dir / "export"
    initial = build_module(cfg.model, cfg.seed)  # the run's start: the same seeded init
    trained, start = weights(export / "transformer"), initial.trainable.state_dict()
    assert trained.keys() == start.keys()
    assert all(v.isfinite().all() for v in trained.values())
    assert any(not torch.equal(v, start[k]) for k, v in trained.items()), "nothing trained"

    pipe = DiffusionPipeline.from_pretrained(export, local_files_only=True)
    assert isinstance(pipe, FluxPipeline)
    assert pipe.scheduler.config.use_dynamic_shifting
    hidden, pooled, _ = pipe.encode_prompt(PROMPTS, None, max_sequence_length=T5_LENGTH)
    cond = initial.conditioner.encode({"caption": PROMPTS}, None)
    # Reloaded weights are equal; the reloaded models' kernels differ in the last bits.
    torch.testing.assert_close(hidden, cond.hidden, rtol=0, atol=1e-5)
    torch.testing.assert_close(pooled, cond.pooled, rtol=0, atol=1e-5)
    # ldm-sample's loader keeps the flow sampler and passes the T5 length trained with.
    pipe = load_pipeline(export)
    assert call_kwargs(pipe) == {"max_sequence_length": T5_LENGTH}
    # Flux's config has no image size: the size is the call's (the run's data.resolution).
    size = cfg.data.resolution
    assert size == 16 == initial.resolution
    images = pipe(PROMPTS[:2], height=size, width=size, num_inference_steps=2, guidance_scale=3.5,
                  output_type="np", generator=torch.Generator().manual_seed(0),
                  **call_kwargs(pipe)).images  # fmt: skip
    assert images.shape == (2, size, size, 3)
    assert images.min() >= 0.0 and images.max() <= 1.0 and images.std() > 0


def test_ldm_export_of_last_ckpt_equals_the_runs_export(flux_run, tmp_path):
    run_dir, _, _ = flux_run
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    again = export_checkpoint(ckpt, tmp_path / "again")
    export = run_dir / "export"
    files = sorted(p.relative_to(export) for p in export.rglob("*.safetensors"))
    assert {f.parts[0] for f in files} == set(MODELS)
    assert sorted(p.relative_to(again) for p in again.rglob("*.safetensors")) == files
    for f in files:
        assert_same(load_file(export / f), load_file(again / f), str(f))
    for name in TOKENIZERS:
        assert_same_tokenizer(export / name, again / name)
    scheduler = "scheduler/scheduler_config.json"
    assert json.loads((export / scheduler).read_text()) == json.loads(
        (again / scheduler).read_text()
    )
    assert json.loads((again / "model_index.json").read_text()) == json.loads(
        (export / "model_index.json").read_text()
    )
    state = load_any_checkpoint(ckpt)["state_dict"]
    backbone = {k.removeprefix("backbone.model."): v for k, v in state.items()
                if k.startswith("backbone.model.")}  # fmt: skip
    assert len(backbone) == len(state), "frozen parts stay out of the checkpoint"
    assert_same(backbone, weights(export / "transformer"), "transformer")


def test_pretrained_presets_train_from_local_folders(compose, demo_shards, tmp_path):
    """model/backbone=flux, model/conditioner=flux and model/vae=pretrained pointed at a
    save_pretrained folder of the tiny parts, laid out as the FLUX.1-dev repository."""
    cfg = compose(*FLUX)
    parts = build_module(cfg.model, cfg.seed).export(tmp_path / "flux-dev")
    run_dir, _, _ = train(
        tmp_path / "out", demo_shards, "model/backbone=flux", "model/conditioner=flux",
        "model/vae=pretrained", f"model.vae.pretrained_model_name_or_path={parts}",
        "model.vae.subfolder=vae", f"model.backbone.model.pretrained_model_name_or_path={parts}",
        "model.backbone.sample_size=8", "model.backbone.gradient_checkpointing=false",
        f"model.conditioner.text_encoder.pretrained_model_name_or_path={parts}",
        f"model.conditioner.max_sequence_length={T5_LENGTH}", "trainer.max_steps=2",
        "callbacks.checkpoint.every_n_train_steps=1",
    )  # fmt: skip
    export = run_dir / "export"
    start, trained = weights(parts / "transformer"), weights(export / "transformer")
    assert any(not torch.equal(v, start[k]) for k, v in trained.items()), "nothing trained"
    for name in MODELS[1:]:  # frozen: shipped as loaded
        assert_same(weights(parts / name), weights(export / name), name)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    frozen = load_any_checkpoint(ckpt)["ldm_parts"]["frozen"]
    for name in (*MODELS[1:], *TOKENIZERS):  # the folders, not the weights
        assert (frozen[name]["pretrained"], frozen[name]["subfolder"]) == (str(parts), name)
        assert "state" not in frozen[name]
    again = export_checkpoint(ckpt, tmp_path / "again")
    for name in ("transformer", "text_encoder_2"):
        assert_same(weights(export / name), weights(again / name), name)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model/objective=ddpm"],
         r"FluxPipeline samples only with flow schedulers; choose model/objective=flow"),
        (["model.backbone.model.in_channels=8"],
         r"in_channels=8 but FluxPipeline packs 2x2 patches of the VAE's 4 latent channels .*"
         r"set model\.backbone\.model\.in_channels=16 \(4 x the VAE's latent_channels\)"),
        (["model.backbone.model.joint_attention_dim=64"],
         r"joint_attention_dim=64 but the conditioner's text tokens are 32 wide; set "
         r"model\.backbone\.model\.joint_attention_dim=32"),
        (["model.backbone.model.pooled_projection_dim=16"],
         r"set model\.backbone\.model\.pooled_projection_dim=32"),
        (["model.conditioner.text_encoder._target_=transformers.CLIPTextModelWithProjection"],
         r"model\.conditioner\.text_encoder is a CLIPTextModelWithProjection .* unprojected"),
        (["model.backbone.model.axes_dims_rope=[4,4,4]"], r"must be even and sum to"),
        (["model.backbone.sample_size=7"], r"model\.backbone\.sample_size=7: .* even"),
        (["model.vae.shift_factor=null"], r"set model\.vae\.shift_factor"),
        (["data.resolution=32"],
         r"set data\.resolution=16 or model\.backbone\.sample_size=16 \(to train at 32 px\)"),
        (["model.conditioner.text_encoder.config.vocab_size=500"],
         r"set model\.conditioner\.text_encoder\.config\.vocab_size=514"),
    ],
    ids=["ddpm", "in-channels", "joint-dim", "pooled-dim", "projection", "rope", "odd-size",
         "shift-factor", "resolution", "vocab"],
)  # fmt: skip
def test_parts_that_cannot_work_fail_before_training(compose, demo_shards, overrides, message):
    cfg = compose(*FLUX, f"data.urls={demo_shards}", *overrides)
    with pytest.raises((InstantiationException, ConfigError)) as err:
        run(cfg)
    cause = err.value if isinstance(err.value, ConfigError) else err.value.__cause__
    assert isinstance(cause, ConfigError), repr(err.value)
    assert re.search(message, str(cause)), str(cause)
    run_dir = Path(cfg.paths.run_dir)
    assert not (run_dir / "checkpoints").exists() and not (run_dir / ".hydra").exists()
