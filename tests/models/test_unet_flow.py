"""A UNet trained by rectified flow (`model/objective=flow_dpm`): the export is a plain
`StableDiffusionPipeline` whose DPM-Solver++ on flow sigmas walks the trained velocity back to
x0, the run's own previews sample the same images, and a FlowMatch export is refused."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline

from train.cli.export import build_module
from train.cli.run import run
from train.errors import ConfigError

PROMPT = "a red circle at the top left on a white background"


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory, demo_shards):
    """A 4-step tiny UNet run by rectified flow: (run_dir, cfg)."""
    from train.config.compose import compose

    root = tmp_path_factory.mktemp("unet_flow")
    cfg = compose([f"paths.root={root}", "experiment=tiny", "model/objective=flow_dpm",
                   f"data.urls={demo_shards}", "logger=none"])  # fmt: skip
    run(cfg)
    return Path(cfg.paths.run_dir), cfg


def test_export_is_a_stable_diffusion_pipeline_on_flow_sigmas(flow_run):
    run_dir, cfg = flow_run
    pipe = DiffusionPipeline.from_pretrained(run_dir / "export", use_safetensors=True)
    assert type(pipe) is StableDiffusionPipeline
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert pipe.scheduler.config.use_flow_sigmas
    assert pipe.scheduler.config.prediction_type == "flow_prediction"
    # The run's own pipeline (previews, ldm-eval in training) samples what the export does.
    module = build_module(cfg.model, cfg.seed)
    module.backbone.model.load_state_dict(pipe.unet.state_dict())
    ours = module.pipeline()
    for p in (pipe, ours):
        p.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=3, output_type="np")
    a = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).images
    b = ours(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).images
    assert a.shape == (1, cfg.data.resolution, cfg.data.resolution, 3) and a.std() > 0
    assert abs(a - b).max() < 1e-5


def test_pipeline_samples_x0_from_an_exact_velocity(flow_run):
    """StableDiffusionPipeline's whole loop (init_noise_sigma, CFG, scale_model_input, the
    scheduler) with the UNet answering the exact velocity (x_t - x0) / sigma: it returns x0, so
    the export reads the UNet's output as the flow training targeted."""
    run_dir, _ = flow_run
    pipe = DiffusionPipeline.from_pretrained(run_dir / "export", use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    scheduler = pipe.scheduler
    seen = []

    def oracle(x_t, t, *args, **kwargs):
        sigma = scheduler.sigmas[scheduler.step_index or 0]
        seen.append((float(t), float(sigma)))
        return ((x_t - x0) / sigma,)

    pipe.unet.forward = oracle
    latents = pipe(PROMPT, num_inference_steps=4, guidance_scale=4.0, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    assert torch.allclose(latents, x0, atol=1e-4)
    # The UNet hears sigma x 1000, the timestep training gives it.
    assert all(abs(t - 1000 * s) < 1.0 for t, s in seen) and len(seen) == 4


@pytest.mark.parametrize("experiment", ["tiny", "sdxl_tiny"])
def test_a_flow_match_export_is_refused_before_training(compose, demo_shards, experiment):
    cfg = compose(
        f"experiment={experiment}",
        "model/objective=flow",
        f"data.urls={demo_shards}",
        "logger=none",
    )
    with pytest.raises(
        ConfigError,
        match=re.escape("model.objective.scheduler_class=FlowMatchEulerDiscreteScheduler"),
    ) as caught:
        run(cfg)
    assert "model/objective=flow_dpm" in str(caught.value)
    assert "StableDiffusion" in str(caught.value)
    assert not (Path(cfg.paths.run_dir) / "checkpoints").exists()
