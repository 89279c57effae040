"""The PixArt family (`PixArtTransformer2DModel` + the MiniLM encoder, rectified flow sampled by
DPM-Solver++ on flow sigmas): training, export, ldm-export, ldm-sample, a pretrained start, the
sampler's step math and bad input."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli
from diffusers import DiffusionPipeline, PixArtSigmaPipeline
from hydra.utils import instantiate
from PIL import Image
from safetensors.torch import load_file

from train.cli.export import build_module, export_checkpoint
from train.cli.run import run
from train.cli.sample import call_kwargs
from train.distributed.sharding import load_any_checkpoint
from train.errors import ConfigError
from train.objectives.flow import interpolate, velocity_target
from train.tasks.pipelines import scheduler_of

PROMPTS = ["a red circle at the top left on a white background",
           "a blue square in the center on a black background"]  # fmt: skip


def pixart(compose, shards: Path, *overrides: str):
    return compose("experiment=pixart_tiny", f"data.urls={shards}", "logger=none", *overrides)


@pytest.fixture(scope="module")
def pixart_run(tmp_path_factory, demo_shards):
    """One `ldm-train experiment=pixart_tiny` (4 steps) in the test process:
    (run_dir, cfg, what it printed)."""
    from train.cli.train import main
    from train.config.compose import compose

    root = tmp_path_factory.mktemp("pixart_run")
    overrides = [f"paths.root={root}", "experiment=pixart_tiny", f"data.urls={demo_shards}",
                 "logger=none"]  # fmt: skip
    cfg = compose(overrides)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = run_cli(main, ["ldm-train", *overrides], env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return Path(cfg.paths.run_dir), cfg, proc.stdout + proc.stderr


def transformer_state(ckpt: Path) -> dict[str, torch.Tensor]:
    state = load_any_checkpoint(ckpt)["state_dict"]
    prefix = "backbone.model."
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def test_tiny_run_trains_the_transformer(pixart_run):
    run_dir, cfg, printed = pixart_run
    loss = float(re.search(r"Final train/loss: ([-+\d.eE]+|nan|inf)", printed).group(1))
    assert torch.isfinite(torch.tensor(loss)) and loss > 0
    trained = transformer_state(run_dir / "checkpoints" / "last.ckpt")
    initial = build_module(cfg.model, cfg.seed).backbone.model.state_dict()  # the run's init
    assert trained.keys() == initial.keys()
    changed = [k for k in trained if not torch.equal(trained[k], initial[k])]
    assert len(changed) > len(trained) // 2, f"only {len(changed)} of {len(trained)} changed"


def test_export_is_a_pixart_pipeline_that_generates(pixart_run):
    run_dir, cfg, _ = pixart_run
    pipe = DiffusionPipeline.from_pretrained(run_dir / "export", use_safetensors=True)
    assert type(pipe) is PixArtSigmaPipeline
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert pipe.scheduler.config.use_flow_sigmas
    assert pipe.scheduler.config.prediction_type == "flow_prediction"
    pipe.set_progress_bar_config(disable=True)
    out = pipe(PROMPTS, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
               output_type="np", **call_kwargs(pipe)).images  # fmt: skip
    size = cfg.data.resolution
    assert out.shape == (2, size, size, 3)
    assert out.min() >= 0.0 and out.max() <= 1.0 and out.std() > 0


def test_training_conditioning_equals_the_pipeline_encode_prompt(pixart_run):
    _, cfg, _ = pixart_run
    module = build_module(cfg.model, cfg.seed)
    pipe = module.pipeline()
    length = module.backbone.pipeline_call_kwargs()["max_sequence_length"]
    assert length == cfg.model.conditioner.tokenizer.model_max_length
    prompts = [*PROMPTS, ""]
    with torch.no_grad():
        embeds, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False,
                                                max_sequence_length=length)  # fmt: skip
        cond = module.conditioner.encode({"caption": prompts}, None)
    assert torch.equal(cond.mask, mask)
    assert torch.allclose(cond.hidden, embeds, atol=1e-6)


def test_ldm_export_equals_the_run_export_and_the_checkpoint(pixart_run, tmp_path):
    run_dir, _, _ = pixart_run
    again = export_checkpoint(run_dir / "checkpoints" / "last.ckpt", tmp_path / "again")
    files = sorted(p.relative_to(run_dir / "export")
                   for p in (run_dir / "export").rglob("*.safetensors"))  # fmt: skip
    assert {f.parts[0] for f in files} == {"transformer", "vae", "text_encoder"}
    assert sorted(p.relative_to(again) for p in again.rglob("*.safetensors")) == files
    for f in files:
        a, b = load_file(run_dir / "export" / f), load_file(again / f)
        assert a.keys() == b.keys(), f
        assert all(torch.equal(a[k], b[k]) for k in a), f
    exported = load_file(next((run_dir / "export" / "transformer").glob("*.safetensors")))
    trained = transformer_state(run_dir / "checkpoints" / "last.ckpt")
    assert exported.keys() == trained.keys()
    assert all(torch.equal(exported[k], trained[k]) for k in trained)


def test_ldm_sample_writes_a_grid(pixart_run, tmp_path):
    from train.cli.sample import main

    run_dir, cfg, _ = pixart_run
    out = tmp_path / "grid.png"
    argv = ["ldm-sample", str(run_dir / "export"), "--out", str(out), "--steps", "2",
            "--num-per-prompt", "2", "--prompt", PROMPTS[0], "--prompt", PROMPTS[1]]  # fmt: skip
    proc = run_cli(main, argv)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"wrote 4 samples to {out}"
    size = cfg.data.resolution
    with Image.open(out) as grid:
        assert grid.size == (2 * size, 2 * size)
    # A DDPM sampler cannot read the velocity: refused in one line, exit 2.
    proc = run_cli(main, [*argv, "--scheduler", "ddim"])
    assert proc.returncode == 2
    assert "rectified flow" in proc.stderr and "leave --scheduler out" in proc.stderr


def test_dpm_solver_on_flow_sigmas_walks_the_flow_back_to_x0(compose, demo_shards):
    """The export's sampler against the objective: fed the exact velocity eps - x0 that training
    targets, every step lands on RectifiedFlow's x_t = (1 - s) x0 + s eps at the next sigma,
    and the last returns x0; the transformer's timestep is the one training gives (s x 1000)."""
    cfg = pixart(compose, demo_shards, "model.objective.shift=3.0")
    objective = instantiate(cfg.model.objective)
    scheduler = scheduler_of(objective, objective.export_scheduler)
    assert scheduler.config.flow_shift == 3.0
    scheduler.set_timesteps(6)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    sigmas = scheduler.sigmas
    assert sigmas[-1] == 0 and sigmas[0] > 0.99
    x = interpolate(x0, eps, sigmas[0].expand(2))
    for i, t in enumerate(scheduler.timesteps):
        assert abs(float(t) - float(sigmas[i]) * objective.num_train_timesteps) < 1.0
        x_in = scheduler.scale_model_input(x, t)
        assert torch.equal(x_in, x)
        x = scheduler.step(velocity_target(x0, eps), t, x, return_dict=False)[0]
        assert torch.allclose(x, interpolate(x0, eps, sigmas[i + 1].expand(2)), atol=1e-5), i
    assert torch.allclose(x, x0, atol=1e-5)


def test_pipeline_samples_x0_from_an_exact_velocity(pixart_run):
    """The whole PixArt pipeline loop (initial noise, CFG, the scheduler) with the transformer
    answering the exact flow velocity (x_t - x0) / sigma towards one latent x0: it returns x0."""
    run_dir, _, _ = pixart_run
    pipe = DiffusionPipeline.from_pretrained(run_dir / "export", use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    scheduler = pipe.scheduler

    def oracle(x_t, *args, **kwargs):
        sigma = scheduler.sigmas[scheduler.step_index or 0]
        return ((x_t - x0) / sigma,)

    pipe.transformer.forward = oracle
    latents = pipe(PROMPTS[0], num_inference_steps=4, guidance_scale=4.0, output_type="latent",
                   generator=torch.Generator().manual_seed(0),
                   **call_kwargs(pipe)).images  # fmt: skip
    assert torch.allclose(latents, x0, atol=1e-4)


def test_a_pretrained_transformer_folder_trains(compose, demo_shards, tmp_path):
    tiny_cfg = pixart(compose, demo_shards)
    torch.manual_seed(5)
    saved = instantiate(tiny_cfg.model.backbone.model)
    saved.save_pretrained(tmp_path / "pixart" / "transformer")
    cfg = pixart(compose, demo_shards, "model/backbone=pixart",
                 f"model.backbone.model.pretrained_model_name_or_path={tmp_path / 'pixart'}",
                 "trainer.max_steps=2", "callbacks.checkpoint.every_n_train_steps=1")  # fmt: skip
    loaded = build_module(cfg.model, cfg.seed).backbone.model
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in saved.state_dict().items())
    run(cfg)
    run_dir = Path(cfg.paths.run_dir)
    trained = transformer_state(run_dir / "checkpoints" / "last.ckpt")
    assert any(not torch.equal(trained[k], v) for k, v in saved.state_dict().items())
    pipe = DiffusionPipeline.from_pretrained(run_dir / "export", use_safetensors=True)
    assert type(pipe) is PixArtSigmaPipeline


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["model.backbone.model.caption_channels=512"],
         "model.backbone.model.caption_channels=512 but the conditioner's hidden size is 384"),
        (["model/objective=flow"],
         "model.objective.scheduler_class=FlowMatchEulerDiscreteScheduler"),
        (["model.conditioner.use_attention_mask=false"],
         "set model.conditioner.use_attention_mask=true"),
    ],
)  # fmt: skip
def test_bad_settings_fail_before_training(compose, demo_shards, overrides, named):
    cfg = pixart(compose, demo_shards, *overrides)
    with pytest.raises(ConfigError, match=re.escape(named)) as caught:
        run(cfg)
    if "objective" in overrides[0]:
        assert "model/objective=flow_dpm" in str(caught.value)
    assert not (Path(cfg.paths.run_dir) / "checkpoints").exists()


def test_the_t5_conditioner_preset_from_a_folder(compose, demo_shards, tmp_path):
    """model/conditioner=pixart_t5 (the real models' T5 encoder) from a local folder laid out
    like the hub one, with a tiny random T5: training's conditioning is the pipeline's, and the
    run exports a PixArt pipeline holding that encoder."""
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    from train.models.conditioners.tiny_tokenizers import tiny_t5_tokenizer

    tok = T5Tokenizer.from_pretrained(tiny_t5_tokenizer())
    tok.save_pretrained(tmp_path / "t5" / "tokenizer")
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                      relative_attention_num_buckets=8, decoder_start_token_id=0)  # fmt: skip
    T5EncoderModel(config).save_pretrained(tmp_path / "t5" / "text_encoder")
    cfg = pixart(compose, demo_shards, "model/conditioner=pixart_t5",
                 f"model.conditioner.model.pretrained_model_name_or_path={tmp_path / 't5'}",
                 "model.conditioner.tokenizer.model_max_length=16",
                 "model.backbone.model.caption_channels=32", "trainer.max_steps=2")  # fmt: skip
    module = build_module(cfg.model, cfg.seed)
    with torch.no_grad():
        embeds, mask, _, _ = module.pipeline().encode_prompt(
            PROMPTS, do_classifier_free_guidance=False, max_sequence_length=16
        )
        cond = module.conditioner.encode({"caption": PROMPTS}, None)
    assert torch.equal(cond.mask, mask) and torch.allclose(cond.hidden, embeds, atol=1e-6)
    run(cfg)
    pipe = DiffusionPipeline.from_pretrained(Path(cfg.paths.run_dir) / "export")
    assert type(pipe.text_encoder).__name__ == "T5EncoderModel"
    assert call_kwargs(pipe)["max_sequence_length"] == 16
