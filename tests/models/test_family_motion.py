"""The AnimateDiff family on CPU: motion modules over a frozen image UNet. The motion UNet starts
out as the image UNet frame by frame, clips are encoded frame by frame, only the motion modules
change in training, the export loads in AnimateDiffPipeline (and its motion_adapter/ alone in
MotionAdapter) and generates clips of the asked frames and size, previews are a frame strip, an
mp4 and a GIF; and the settings that cannot work are refused before a start."""

from __future__ import annotations

import re
from pathlib import Path

import av
import pytest
import torch
from cli_runner import run_cli
from diffusers import AnimateDiffPipeline, MotionAdapter, UNet2DConditionModel, UNetMotionModel
from hydra.utils import instantiate
from PIL import Image

from train.cli.export import build_module
from train.config.compose import compose
from train.errors import ConfigError
from train.models.backbones.motion import MotionUNetBackbone, unet_problems
from train.models.conditioning import Conditioning
from train.models.parts import posterior_of

MOTION = ("experiment=motion_tiny", "logger=none")
CAPTION = "a red circle moving from left to right on a white background"


def image_unet(**overrides) -> UNet2DConditionModel:
    torch.manual_seed(0)
    config = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                  attention_head_dim=8, cross_attention_dim=16, norm_num_groups=32)  # fmt: skip
    return UNet2DConditionModel(**{**config, **overrides})


def adapter(**overrides) -> MotionAdapter:
    config = dict(block_out_channels=(32, 64), motion_layers_per_block=1,
                  motion_norm_num_groups=32, motion_num_attention_heads=4)  # fmt: skip
    return MotionAdapter(**{**config, **overrides})


@pytest.fixture(scope="module")
def motion_run(tmp_path_factory, motion_shards):
    from train.cli.train import main

    root = tmp_path_factory.mktemp("motion")
    prompts = f"callbacks.samples.prompts=[{CAPTION}]"
    args = [f"paths.root={root}", *MOTION, f"data.urls={motion_shards}", prompts]
    cfg = compose(args)
    proc = run_cli(main, ["ldm-train", *args])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return Path(cfg.paths.run_dir), cfg


def test_motion_unet_starts_as_the_image_unet_frame_by_frame():
    unet = image_unet()
    backbone = MotionUNetBackbone(unet, adapter(), num_frames=5)
    x = torch.randn(2, 4, 5, 8, 8)  # [B, C, F, h, w]
    t = torch.tensor([10, 700])
    hidden = torch.randn(2, 7, 16)
    with torch.no_grad():
        video = backbone(x, t, Conditioning(hidden=hidden))
        frames = unet(x.transpose(1, 2).reshape(10, 4, 8, 8), t.repeat_interleave(5),
                      encoder_hidden_states=hidden.repeat_interleave(5, 0)).sample  # fmt: skip
    assert video.shape == x.shape
    torch.testing.assert_close(video.transpose(1, 2).reshape(10, 4, 8, 8), frames)
    trained = {n for n, p in backbone.model.named_parameters() if p.requires_grad}
    assert trained and all("motion_modules" in n for n in trained)
    # Without the zero init the motion modules change the prediction from the first step.
    other = MotionUNetBackbone(image_unet(), adapter(), num_frames=5, zero_init=False)
    with torch.no_grad():
        assert (other(x, t, Conditioning(hidden=hidden)) - video).abs().max() > 1e-3


def test_clips_are_encoded_frame_by_frame(compose):
    vae = instantiate(compose(*MOTION).model.vae)
    clip = torch.rand(2, 3, 5, 16, 16) * 2 - 1
    with torch.no_grad():
        posterior = posterior_of(vae, clip)
        frame = vae.encode(clip[:, :, 3]).latent_dist
    assert posterior.mean.shape == (2, 4, 5, 8, 8)
    torch.testing.assert_close(posterior.mean[:, :, 3], frame.mean)
    torch.testing.assert_close(posterior.std[:, :, 3], frame.std)


def test_training_changes_the_motion_modules_alone(motion_run):
    run_dir, cfg = motion_run
    fresh = build_module(cfg.model, cfg.seed).trainable.state_dict()
    trained = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    trained = {k.removeprefix("backbone.model."): v for k, v in trained.items()}
    assert set(trained) == set(fresh)
    changed = {k for k in fresh if not torch.equal(fresh[k], trained[k])}
    assert changed and all("motion_modules" in k for k in changed)
    assert any("motion_modules" in k and "proj_out" in k for k in changed)  # left zero


def test_export_loads_in_animatediff_and_makes_clips(motion_run):
    run_dir, _ = motion_run
    pipe = AnimateDiffPipeline.from_pretrained(run_dir / "export")
    assert isinstance(pipe.unet, UNetMotionModel) and pipe.motion_adapter is None
    for frames in (5, 7):
        out = pipe([CAPTION], num_frames=frames, height=16, width=16, num_inference_steps=2,
                   generator=torch.Generator().manual_seed(0), output_type="pt").frames  # fmt: skip
        assert out.shape == (1, frames, 3, 16, 16)
        assert torch.isfinite(out).all() and out.std() > 0
    # motion_adapter/: the trained motion modules alone, as AnimateDiff users share them.
    alone = MotionAdapter.from_pretrained(run_dir / "export" / "motion_adapter")
    unet = pipe.unet.state_dict()
    for name, value in alone.state_dict().items():
        torch.testing.assert_close(value, unet[name])


def test_previews_are_a_frame_strip_an_mp4_and_a_gif(motion_run):
    samples = motion_run[0] / "samples"
    assert Image.open(samples / "final.png").size == (5 * 16, 16)  # one clip, 5 frames
    gif = Image.open(samples / "final.gif")
    assert gif.n_frames == 5 and gif.size == (16, 16)
    with av.open(str(samples / "final.mp4")) as container:
        frames = list(container.decode(video=0))
    assert len(frames) == 5 and (frames[0].width, frames[0].height) == (16, 16)


def test_image_unets_animatediff_cannot_hold_are_named():
    demo_like = image_unet(addition_embed_type="text", resnet_time_scale_shift="scale_shift")
    with pytest.raises(ConfigError) as e:
        MotionUNetBackbone(demo_like, adapter())
    message = str(e.value)
    assert "addition_embed_type='text'" in message
    assert "resnet_time_scale_shift='scale_shift'" in message
    problems = unet_problems(dict(image_unet().config),
                             dict(adapter(block_out_channels=(32, 32)).config))  # fmt: skip
    assert len(problems) == 1 and "block_out_channels=[32, 32]" in problems[0]
    with pytest.raises(ConfigError, match="motion_max_seq_length=32"):
        MotionUNetBackbone(image_unet(), adapter(), num_frames=40)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (("data.video=null",), "these are video shards: read them with +data/video=clips"),
        (("model/backbone=unet_tiny", "model.backbone.model.cross_attention_dim=384"),
         "data.video is set but model.backbone (UNetBackbone) is an image model"),
        (("model.backbone.unet.sample_size=4",), "model.backbone.unet.sample_size"),
    ],
)
def test_video_and_image_settings_that_cannot_meet_are_refused(overrides, needle, motion_shards):
    from train.config.checks import early_checks

    cfg = compose([*MOTION, f"data.urls={motion_shards}", *overrides])
    with pytest.raises(ConfigError, match=re.escape(needle)):
        early_checks(cfg, run_dir=False)


def test_ldm_sample_writes_clips(motion_run, tmp_path):
    from train.cli.sample import main

    export = str(motion_run[0] / "export")
    out = tmp_path / "clip.mp4"
    proc = run_cli(main, ["ldm-sample", export, "--prompt", CAPTION, "--prompt", "a blue square",
                          "--frames", "6", "--steps", "2", "--out", str(out)])  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "wrote 2 clips of 6 frames" in proc.stdout
    with av.open(str(out)) as container:
        frames = list(container.decode(video=0))
    assert len(frames) == 6 and (frames[0].width, frames[0].height) == (32, 16)  # 2 clips wide
    strip = tmp_path / "strip.png"
    proc = run_cli(main, ["ldm-sample", export, "--prompt", CAPTION, "--frames", "3",
                          "--steps", "2", "--out", str(strip)])  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert Image.open(strip).size == (3 * 16, 16)


@pytest.mark.parametrize(
    ("which", "args", "needle"),
    [
        ("image", ["--frames", "8"], "--frames is for video exports"),
        ("image", ["--out", "x.mp4"], "--out x.mp4 is for video exports"),
        ("video", ["--out", "x.jpg"], "a video export writes .mp4, .gif, .png"),
    ],
)
def test_ldm_sample_refuses_clip_arguments_that_do_not_fit(
    which, args, needle, motion_run, tiny_run
):
    from train.cli.sample import main

    export = (motion_run if which == "video" else tiny_run)[0] / "export"
    proc = run_cli(main, ["ldm-sample", str(export), "--prompt", "x", *args])
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr


def test_ldm_export_of_last_ckpt_equals_the_runs_export(motion_run, tmp_path):
    from safetensors.torch import load_file

    from train.cli.export import export_checkpoint

    run_dir = motion_run[0]
    again = export_checkpoint(run_dir / "checkpoints" / "last.ckpt", tmp_path / "again")
    export = run_dir / "export"
    files = sorted(p.relative_to(export) for p in export.rglob("*.safetensors"))
    assert Path("motion_adapter/diffusion_pytorch_model.safetensors") in files
    assert sorted(p.relative_to(again) for p in again.rglob("*.safetensors")) == files
    for f in files:
        a, b = load_file(export / f), load_file(again / f)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f


def test_a_video_backbone_without_clips_is_refused():
    from train.config.fit import check_video_inputs

    cfg = compose([*MOTION, "data.urls=/nowhere", "data.video=null"])
    with pytest.raises(ConfigError, match="a video model, but data.video is not set"):
        check_video_inputs(cfg)
