"""Inpainting fine-tuning from a pretrained 4-channel base (the session's tiny run's export): the
UNet is widened to 9 channels without changing what it predicts, masks and the masked loss are
what they claim, and the export is a StableDiffusionInpaintPipeline that predicts and paints
like the trained module."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runner import run_cli
from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel
from finetune_runs import finetune_overrides
from PIL import Image

from train.cli.export import module_from_checkpoint
from train.config.compose import compose
from train.models.backbones.inpaint import InpaintUNetBackbone, widen_conv_in
from train.models.conditioning import Conditioning
from train.objectives.base import weighted_mse
from train.objectives.masks import RandomMasks, masked_mse
from train.tasks.rng import SampleRNG

PROMPT = "a blue square in the center on a black background"


@pytest.fixture(scope="module")
def inpaint_run(tmp_path_factory, tiny_run, demo_shards):
    from train.cli.train import main

    base = tiny_run[0] / "export"
    root = tmp_path_factory.mktemp("inpaint")
    args = finetune_overrides("inpaint", root, base, demo_shards, "model.backbone.masked_loss=true")
    proc = run_cli(main, ["ldm-train", *args])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return Path(compose(args).paths.run_dir), base


def nine_channel_inputs(text_dim: int) -> tuple:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 9, 8, 8, generator=g), torch.tensor([10, 700]),
            torch.randn(2, 6, text_dim, generator=g))  # fmt: skip


def test_a_widened_unet_predicts_what_its_base_predicts(tiny_run) -> None:
    base = UNet2DConditionModel.from_pretrained(tiny_run[0] / "export", subfolder="unet")
    wide = widen_conv_in(copy.deepcopy(base), 9)
    assert wide.config.in_channels == 9 and wide.conv_in.weight.shape[1] == 9
    x, t, hidden = nine_channel_inputs(base.config.cross_attention_dim)
    with torch.no_grad():
        # Whatever the mask and masked latents hold, the zero weights ignore them.
        torch.testing.assert_close(wide(x, t, hidden).sample, base(x[:, :4], t, hidden).sample)
    backbone = InpaintUNetBackbone(copy.deepcopy(base))
    assert backbone.latent_channels == 4 and backbone.pipeline_class.endswith("InpaintPipeline")
    cond = Conditioning(hidden=hidden, inpaint=x[:, 4:])
    with torch.no_grad():
        torch.testing.assert_close(backbone(x[:, :4], t, cond), base(x[:, :4], t, hidden).sample)


def test_random_masks_are_boxes_strokes_and_whole_images_in_their_shares() -> None:
    masks = RandomMasks(box=0.5, stroke=0.25, full=0.25, min_side=0.2, max_side=0.7)
    drawn = masks.draw(SampleRNG.for_rows(0, 3, 0, 400, "cpu"), 32, 32)
    assert drawn.shape == (400, 1, 32, 32) and set(drawn.unique().tolist()) <= {0.0, 1.0}
    again = masks.draw(SampleRNG.for_rows(0, 3, 0, 400, "cpu"), 32, 32)
    assert torch.equal(drawn, again)  # a function of (seed, step, row), like the noise
    area = drawn.mean(dim=(1, 2, 3))
    full = area == 1
    rows, cols = drawn[:, 0].amax(dim=2), drawn[:, 0].amax(dim=1)  # [N, 32] each
    # A box fills its bounding box exactly; a stroke does not.
    bbox = rows.sum(1) * cols.sum(1)
    boxy = ~full & (drawn[:, 0].sum(dim=(1, 2)) == bbox) & (area > 0)
    assert 0.18 < full.float().mean() < 0.32
    assert 0.40 < boxy.float().mean() < 0.60
    sides = rows[boxy].sum(1) / 32
    assert sides.min() >= 0.2 - 1 / 32 and sides.max() <= 0.7 + 1 / 32
    strokes = ~full & ~boxy
    assert (drawn[strokes].sum(dim=(1, 2, 3)) > 0).all()  # every stroke paints something


def test_the_masked_loss_is_normalised_by_the_mask_area() -> None:
    target = torch.zeros(2, 4, 8, 8)
    prediction = torch.full((2, 4, 8, 8), 0.5)  # the same error everywhere
    small, large = torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 8)
    small[:, :, :2, :2], large[:, :, :, :6] = 1, 1
    weights = torch.ones(2)
    assert masked_mse(prediction, target, small, weights) == pytest.approx(0.25)
    assert masked_mse(prediction, target, large, weights) == pytest.approx(0.25)
    # Only the masked latents count; with a full mask it is the plain loss.
    prediction[:, :, 4:, 4:] = 3.0  # outside `small`
    assert masked_mse(prediction, target, small, weights) == pytest.approx(0.25)
    full = torch.ones(2, 1, 8, 8)
    torch.testing.assert_close(masked_mse(prediction, target, full, weights),
                               weighted_mse(prediction, target, weights))  # fmt: skip


def test_the_export_is_an_inpaint_pipeline_that_paints_like_the_trained_module(inpaint_run):
    run_dir, base = inpaint_run
    module, _ = module_from_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    pipe = StableDiffusionInpaintPipeline.from_pretrained(run_dir / "export", safety_checker=None)
    assert pipe.unet.config.in_channels == 9
    assert pipe.unet.conv_in.weight[:, 4:].abs().max() > 1e-3  # the new channels trained
    x, t, hidden = nine_channel_inputs(pipe.text_encoder.config.hidden_size)
    with torch.no_grad():
        trained = module.trainable.eval()(x, t, hidden).sample
        torch.testing.assert_close(pipe.unet(x, t, hidden).sample, trained, atol=1e-6, rtol=0)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), np.uint8))
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 255
    kw = dict(image=image, mask_image=Image.fromarray(mask), num_inference_steps=2,
              output_type="np", height=16, width=16)  # fmt: skip
    ours = module.pipeline(scheduler=pipe.scheduler)(PROMPT, generator=torch.manual_seed(0), **kw)
    theirs = pipe(PROMPT, generator=torch.manual_seed(0), **kw)
    np.testing.assert_allclose(theirs.images, ours.images, atol=1e-5)


def test_ldm_sample_needs_the_image_and_mask_of_an_inpainting_export(inpaint_run, tmp_path):
    from train.cli.sample import main

    run_dir, _ = inpaint_run
    proc = run_cli(main, ["ldm-sample", str(run_dir / "export"), "--prompt", PROMPT,
                          "--out", str(tmp_path / "g.png")])  # fmt: skip
    assert proc.returncode == 2
    assert "inpainting pipeline" in proc.stderr and "--init-image IMG --mask MASK" in proc.stderr
