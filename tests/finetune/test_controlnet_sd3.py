"""SD3 ControlNet training from a pretrained SD3 folder (the tiny parts, saved first): only the
SD3ControlNetModel trains and is checkpointed, the objective takes the base's flow scheduler, the
export loads in StableDiffusion3ControlNetPipeline with the base untouched and predicts what the
trained module predicts, and ldm-sample drives it with a control image."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runner import run_cli
from diffusers import SD3ControlNetModel, StableDiffusion3ControlNetPipeline
from finetune_runs import finetune_overrides
from PIL import Image
from safetensors.torch import load_file

from train.cli.export import build_module, module_from_checkpoint
from train.config.compose import compose
from train.errors import ConfigError
from train.models.backbones.controlnet_sd3 import SD3ControlNetBackbone
from train.models.backbones.sd3 import SD3Backbone
from train.models.conditioning import Conditioning
from train.objectives.flow import RectifiedFlow

PROMPT = "a red circle at the top left on a white background"
T5_LENGTH = 32  # the tiny base's model.conditioner.max_sequence_length


def mask_image(x0: int, y0: int, side: int = 6, size: int = 16) -> Image.Image:
    arr = np.zeros((size, size, 3), np.uint8)
    arr[y0 : y0 + side, x0 : x0 + side] = 255
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def sd3_base(tmp_path_factory) -> Path:
    """The tiny SD3 pipeline (random init) saved as a diffusers folder: what a user's SD3 is."""
    cfg = compose(["experiment=sd3_tiny"])
    out = tmp_path_factory.mktemp("sd3_base") / "export"
    return build_module(cfg.model, cfg.seed).export(out)


def sd3_controlnet_overrides(root: Path, base: Path, shards: Path, *extra: str) -> list[str]:
    return finetune_overrides(
        "controlnet_sd3", root, base, shards, "data/control=mask",
        f"model.conditioner.max_sequence_length={T5_LENGTH}",
        "model.backbone.num_layers=1", *extra,
    )  # fmt: skip


@pytest.fixture(scope="module")
def sd3_controlnet_run(tmp_path_factory, sd3_base, demo_shards):
    from train.cli.train import main

    args = sd3_controlnet_overrides(tmp_path_factory.mktemp("sd3_cn"), sd3_base, demo_shards)
    proc = run_cli(main, ["ldm-train", *args])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return Path(compose(args).paths.run_dir), sd3_base


def block_outputs(controlnet: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    cond = Conditioning(hidden=torch.randn(2, 77 + T5_LENGTH, 64, generator=g),
                        pooled=torch.randn(2, 64, generator=g),
                        control=torch.randn(2, 4, 8, 8, generator=g))  # fmt: skip
    x = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        return SD3ControlNetBackbone.predict(controlnet, x, torch.tensor([50.0, 900.0]), cond)


def test_checkpoint_holds_only_the_controlnet_and_the_objective_is_the_bases(
    sd3_controlnet_run,
) -> None:
    run_dir, base = sd3_controlnet_run
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    keys = set(ckpt["state_dict"])
    assert keys and all(k.startswith("backbone.model.") for k in keys)
    exported = SD3ControlNetModel.from_pretrained(run_dir / "export" / "controlnet")
    assert len(keys) == len(exported.state_dict()) and exported.config.num_layers == 1
    assert ckpt["ldm_parts"]["frozen"]["transformer"]["pretrained"] == str(base)
    module, _ = module_from_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    scheduler = json.loads((base / "scheduler" / "scheduler_config.json").read_text())
    assert isinstance(module.objective, RectifiedFlow)
    assert module.objective.shift == scheduler["shift"]
    assert module.objective.export_scheduler == scheduler["_class_name"]


def test_export_loads_in_diffusers_and_predicts_like_the_trained_module(
    sd3_controlnet_run,
) -> None:
    run_dir, base = sd3_controlnet_run
    module, _ = module_from_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    pipe = StableDiffusion3ControlNetPipeline.from_pretrained(run_dir / "export")
    trained = block_outputs(module.trainable.eval())
    loaded = block_outputs(SD3ControlNetModel.from_pretrained(run_dir / "export" / "controlnet"))
    assert trained.abs().max() > 1e-3  # trained: the zero projections moved off zero
    torch.testing.assert_close(loaded, trained, atol=1e-6, rtol=0)
    # The export's transformer is the base's, weights and config (its depth) untouched.
    want = load_file(base / "transformer" / "diffusion_pytorch_model.safetensors")
    got = load_file(run_dir / "export" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert pipe.transformer.config.num_layers == 2
    # The pipeline the run builds and diffusers' own, from the export folder: the same image.
    kw = dict(num_inference_steps=2, output_type="np", height=16, width=16,
              max_sequence_length=T5_LENGTH)  # fmt: skip
    ours = module.pipeline(scheduler=pipe.scheduler)(
        PROMPT, control_image=mask_image(2, 2), generator=torch.manual_seed(0), **kw
    ).images
    theirs = pipe(PROMPT, control_image=mask_image(2, 2), generator=torch.manual_seed(0), **kw)
    np.testing.assert_allclose(theirs.images, ours, atol=1e-5)
    # The control steers the image: another mask, another picture.
    other = pipe(PROMPT, control_image=mask_image(9, 9), generator=torch.manual_seed(0), **kw)
    assert np.abs(other.images - ours).max() > 1e-3


def test_control_latents_are_the_pipelines(sd3_controlnet_run) -> None:
    """The pipeline's control preprocessing (to [-1, 1], VAE, scaling; no shift for InstantX's
    design), at the posterior mean that training uses."""
    run_dir, _ = sd3_controlnet_run
    module, _ = module_from_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    pipe = StableDiffusion3ControlNetPipeline.from_pretrained(run_dir / "export")
    image = mask_image(3, 5)
    pixels = torch.from_numpy(np.asarray(image, np.float32) / 255).permute(2, 0, 1)[None]
    ours = module.backbone.encode_control(pixels, module.vae)
    prepared = pipe.image_processor.preprocess(image, height=16, width=16)
    with torch.no_grad():
        theirs = pipe.vae.encode(prepared).latent_dist.mean * pipe.vae.config.scaling_factor
    assert ours.shape == (1, 4, 8, 8)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_ldm_sample_with_a_control_image(sd3_controlnet_run, tmp_path) -> None:
    from train.cli.sample import main

    run_dir, base = sd3_controlnet_run
    mask_image(2, 2).save(tmp_path / "mask.png")
    out = tmp_path / "grid.png"
    args = ["ldm-sample", str(run_dir / "export"), "--prompt", PROMPT, "--steps", "2",
            "--control-image", str(tmp_path / "mask.png"), "--out", str(out)]  # fmt: skip
    proc = run_cli(main, args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    pipe = StableDiffusion3ControlNetPipeline.from_pretrained(run_dir / "export")
    torch.manual_seed(0)  # the pipeline samples the control's VAE posterior from the global RNG
    # (and ldm-sample passes the trained T5 length, as here)
    want = pipe([PROMPT], control_image=mask_image(2, 2), num_inference_steps=2,
                guidance_scale=4.0, max_sequence_length=T5_LENGTH,
                generator=torch.Generator().manual_seed(0)).images[0]  # fmt: skip
    got = np.asarray(Image.open(out).convert("RGB"), dtype=np.int16)
    assert np.abs(got - np.asarray(want, dtype=np.int16)).max() <= 1


def tiny_transformer() -> torch.nn.Module:
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
        joint_attention_dim=64, pooled_projection_dim=64, pos_embed_max_size=16,
    )  # fmt: skip


def test_an_sd3_controlnet_starts_as_its_base_and_leaves_its_config_alone() -> None:
    transformer = tiny_transformer()
    backbone = SD3ControlNetBackbone(SD3Backbone(transformer), num_layers=1)
    assert transformer.config.num_layers == 2  # from_transformer would have written 1 there
    block = transformer.transformer_blocks[0].state_dict()
    for k, v in backbone.model.transformer_blocks[0].state_dict().items():
        assert torch.equal(v, block[k]), k
    assert set(backbone.state_dict()) == {f"model.{k}" for k in backbone.model.state_dict()}
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([5.0, 900.0])
    cond = Conditioning(hidden=torch.randn(2, 9, 64, generator=g),
                        pooled=torch.randn(2, 64, generator=g),
                        control=torch.randn(2, 4, 8, 8, generator=g))  # fmt: skip
    with torch.no_grad():
        base = SD3Backbone.predict(transformer, x, t, cond)
        torch.testing.assert_close(backbone(x, t, cond), base)  # zero projections: no change
        for p in backbone.model.controlnet_blocks.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))  # (a constant shift is normed away)
        assert (backbone(x, t, cond) - base).abs().max() > 1e-3
    with pytest.raises(ConfigError, match="no control image"):
        backbone(x, t, Conditioning(hidden=cond.hidden, pooled=cond.pooled))
    with pytest.raises(ConfigError, match=r"num_layers=2: .* the first 1 of 2 .*choose 1 to 1"):
        SD3ControlNetBackbone(SD3Backbone(transformer), num_layers=2)
    assert SD3ControlNetBackbone(SD3Backbone(transformer)).model.config.num_layers == 1


def test_a_ddpm_base_is_refused_by_the_flow_objective(tiny_run) -> None:
    with pytest.raises(ValueError, match=r"without flow sigmas.*ddpm_pretrained"):
        RectifiedFlow.from_pretrained(str(tiny_run[0] / "export"))
