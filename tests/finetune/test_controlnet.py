"""ControlNet training from a pretrained base (the session's tiny run's export): only the
ControlNet trains and is checkpointed, its export loads in diffusers' ControlNet pipeline and
predicts what the trained module predicts, and ldm-sample drives it with a control image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runner import run_cli
from diffusers import (
    ControlNetModel,
    DDIMScheduler,
    StableDiffusionControlNetPipeline,
    UNet2DConditionModel,
)
from finetune_runs import finetune_overrides
from omegaconf import OmegaConf
from PIL import Image

from train.cli.export import module_from_checkpoint
from train.config.checks import early_checks
from train.config.compose import compose
from train.errors import ConfigError
from train.models.backbones.controlnet import ControlNetBackbone
from train.models.backbones.unet import UNetBackbone
from train.models.conditioning import Conditioning

PROMPT = "a red circle at the top left on a white background"


def controlnet_overrides(
    root: Path, base: Path, shards: Path, *extra: str, logger: str = "none"
) -> list[str]:
    return finetune_overrides(
        "controlnet", root, base, shards,
        "data/control=mask",  # the shapes' silhouettes, computed from each image
        "model.backbone.conditioning_embedding_out_channels=[8,16]",  # the tiny VAE's 2x
        *extra, logger=logger,
    )  # fmt: skip


@pytest.fixture(scope="module")
def controlnet_run(tmp_path_factory, tiny_run, demo_shards):
    from train.cli.train import main

    base = tiny_run[0] / "export"
    root = tmp_path_factory.mktemp("controlnet")
    store = f"logger.mlflow.tracking_uri=sqlite:///{root}/mlflow.db"
    args = controlnet_overrides(root, base, demo_shards, store, logger="mlflow")
    proc = run_cli(main, ["ldm-train", *args])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return Path(compose(args).paths.run_dir), base


def mask_image(x0: int, y0: int, side: int = 6, size: int = 16) -> Image.Image:
    arr = np.zeros((size, size, 3), np.uint8)
    arr[y0 : y0 + side, x0 : x0 + side] = 255
    return Image.fromarray(arr)


def residuals(controlnet: torch.nn.Module, text_dim: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    hidden = torch.randn(2, 6, text_dim, generator=g)
    control = torch.rand(2, 3, 16, 16, generator=g)
    with torch.no_grad():
        down, mid = controlnet(x, torch.tensor([10, 700]), encoder_hidden_states=hidden,
                               controlnet_cond=control, return_dict=False)  # fmt: skip
    return torch.cat([r.flatten() for r in (*down, mid)])


def test_checkpoint_holds_only_the_controlnet_and_names_its_base(controlnet_run) -> None:
    run_dir, base = controlnet_run
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    keys = set(ckpt["state_dict"])
    assert keys and all(k.startswith("backbone.model.") for k in keys)
    exported = ControlNetModel.from_pretrained(run_dir / "export" / "controlnet")
    assert len(keys) == len(exported.state_dict())
    # The frozen UNet is not in the checkpoint: the spec records where it loads from.
    assert ckpt["ldm_parts"]["frozen"]["unet"]["pretrained"] == str(base)


def test_mlflow_records_the_base_on_the_run_and_the_registered_version(controlnet_run) -> None:
    from mlflow import MlflowClient

    from train.tracking.lineage import base_sha256

    run_dir, base = controlnet_run
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.parents[1]}/mlflow.db")
    run = client.get_run((run_dir / "mlflow_run_id").read_text().strip())
    digest = base_sha256.__wrapped__(str(base))
    assert run.data.tags["base_model"] == str(base) and len(digest) == 64
    assert run.data.tags["base_model.sha256"] == digest
    assert "adapter.type" not in run.data.tags  # no adapter: the ControlNet is a whole model
    (version,) = client.search_model_versions(f"run_id = '{run.info.run_id}'")
    assert version.tags["base_model.sha256"] == digest and version.tags["format"] == "diffusers"


def test_export_loads_in_diffusers_and_predicts_like_the_trained_module(controlnet_run) -> None:
    run_dir, base = controlnet_run
    module, _ = module_from_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        run_dir / "export", safety_checker=None
    )
    text_dim = pipe.text_encoder.config.hidden_size
    trained = residuals(module.trainable.eval(), text_dim)
    loaded = residuals(ControlNetModel.from_pretrained(run_dir / "export" / "controlnet"), text_dim)
    assert trained.abs().max() > 1e-3  # trained: the zero convolutions moved off zero
    torch.testing.assert_close(loaded, trained, atol=1e-6, rtol=0)
    # The export's UNet is the base's, untouched.
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet").state_dict()
    for k, v in pipe.unet.state_dict().items():
        assert torch.equal(v, unet[k]), k
    # The pipeline the run builds and diffusers' own, from the export folder: the same image.
    control = mask_image(2, 2)
    kw = dict(num_inference_steps=2, output_type="np", height=16, width=16)
    ours = module.pipeline(scheduler=pipe.scheduler)(
        PROMPT, image=control, generator=torch.manual_seed(0), **kw
    ).images
    theirs = pipe(PROMPT, image=control, generator=torch.manual_seed(0), **kw).images
    np.testing.assert_allclose(theirs, ours, atol=1e-5)
    # The control steers the image: another mask, another picture.
    other = pipe(PROMPT, image=mask_image(9, 9), generator=torch.manual_seed(0), **kw).images
    assert np.abs(other - theirs).max() > 1e-3


def test_ldm_sample_with_a_control_image(controlnet_run, tmp_path) -> None:
    from train.cli.sample import main

    run_dir, base = controlnet_run
    mask_image(2, 2).save(tmp_path / "mask.png")
    out = tmp_path / "grid.png"
    args = ["ldm-sample", str(run_dir / "export"), "--prompt", PROMPT, "--steps", "2",
            "--control-image", str(tmp_path / "mask.png"), "--out", str(out)]  # fmt: skip
    proc = run_cli(main, args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        run_dir / "export", safety_checker=None
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # ldm-sample's default
    want = pipe([PROMPT], image=mask_image(2, 2), num_inference_steps=2, guidance_scale=4.0,
                generator=torch.Generator().manual_seed(0)).images[0]  # fmt: skip
    got = np.asarray(Image.open(out).convert("RGB"), dtype=np.int16)
    assert np.abs(got - np.asarray(want, dtype=np.int16)).max() <= 1
    # Without a control image, and a control image for an export without a ControlNet.
    no_control = run_cli(main, args[:6] + ["--out", str(out)])
    assert no_control.returncode == 2
    assert "give its control image with --control-image" in no_control.stderr
    plain = run_cli(main, ["ldm-sample", str(base), *args[2:]])
    assert plain.returncode == 2 and "has no ControlNet" in plain.stderr


def test_a_controlnet_without_control_images_is_refused_before_building(tiny_run, tmp_path):
    args = controlnet_overrides(tmp_path, tiny_run[0] / "export", tmp_path, "data.control=null")
    cfg = compose(args)
    with pytest.raises(ConfigError, match="data/control=member"):
        early_checks(cfg, run_dir=False)
    cfg = compose([*args[:-1], "callbacks/eval=clip", f"callbacks.eval.reference={tmp_path}"])
    with pytest.raises(ConfigError, match="callbacks/eval scores prompts without images"):
        early_checks(cfg, run_dir=False)


def sdxl_unet() -> UNet2DConditionModel:
    node = OmegaConf.load(Path(__file__).parents[2] / "conf/model/backbone/unet_sdxl_tiny.yaml")
    cfg = OmegaConf.to_container(node.model)
    cfg.pop("_target_"), cfg.pop("_convert_")
    torch.manual_seed(0)
    return UNet2DConditionModel(**cfg)


def test_an_sdxl_controlnet_starts_as_its_base_and_checks_the_vae_factor() -> None:
    unet = sdxl_unet()
    backbone = ControlNetBackbone(UNetBackbone(unet), conditioning_embedding_out_channels=[8, 16])
    assert backbone.pipeline_class == "StableDiffusionXLControlNetPipeline"
    assert set(backbone.state_dict()) == {f"model.{k}" for k in backbone.model.state_dict()}
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([5, 900])
    cond = Conditioning(hidden=torch.randn(2, 7, 80, generator=g),
                        pooled=torch.randn(2, 16, generator=g),
                        sizes=torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2),
                        control=torch.rand(2, 3, 16, 16, generator=g))  # fmt: skip
    with torch.no_grad():
        base = UNetBackbone.predict(unet, x, t, cond)
        torch.testing.assert_close(backbone(x, t, cond), base)  # zero convolutions: no change
        for p in backbone.model.controlnet_down_blocks.parameters():
            p.add_(0.1)
        assert (backbone(x, t, cond) - base).abs().max() > 1e-3
    with pytest.raises(ConfigError, match="conditioning_embedding_out_channels has 2 entries"):
        backbone.check_scale_factor(8)
    with pytest.raises(ConfigError, match="no control image"):
        backbone(x, t, Conditioning(hidden=cond.hidden, pooled=cond.pooled, sizes=cond.sizes))
