"""The Wan video family on CPU: a video DiT over a causal 3D VAE (AutoencoderKLWan) with
rectified flow. Clips are encoded whole and normalised per channel, image-to-video's first-frame
inputs are the ones WanImageToVideoPipeline builds, text-to-video and image-to-video runs export
folders their diffusers pipelines load and sample at the asked frames and size (also through
ldm-sample), the from_pretrained configs train from such an export, and frame counts or inputs
the family cannot take are refused before a start."""

from __future__ import annotations

import re
from pathlib import Path

import av
import pytest
import torch
from cli_runner import run_cli
from diffusers import (
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from hydra.utils import instantiate
from PIL import Image

from train.config.compose import compose
from train.errors import ConfigError
from train.models.backbones.wan import WanBackbone, WanImageToVideoBackbone, nearest_frame_counts
from train.models.parts import normalize_latents, posterior_of
from train.tasks import first_frame

WAN = ("experiment=wan_tiny", "logger=none")
I2V = (*WAN, "model/backbone=wan_i2v_tiny")
CAPTION = "a red circle moving from left to right on a white background"


def tiny_vae() -> AutoencoderKLWan:
    """model/vae=wan_tiny, seeded."""
    torch.manual_seed(0)
    return instantiate(compose(list(WAN)).model.vae).eval()


def tiny_transformer(in_channels: int = 16) -> WanTransformer3DModel:
    """model/backbone=wan_tiny's transformer, seeded; ``in_channels`` 36 for image-to-video."""
    torch.manual_seed(0)
    return instantiate(compose(list(WAN)).model.backbone.model, in_channels=in_channels)


@pytest.fixture(scope="module")
def wan_shards(tmp_path_factory) -> Path:
    """16 moving-shapes clips of 5 frames (4k+1) at 32 px."""
    from data.shards_video import write_motion_demo_shards

    out = tmp_path_factory.mktemp("wan_shapes")
    write_motion_demo_shards(out, num_samples=16, samples_per_shard=8, size=32, frames=5, seed=2)
    return out


def train(root: Path, args: tuple[str, ...], shards: Path) -> tuple[Path, object]:
    from train.cli.train import main

    args = (f"paths.root={root}", *args, f"data.urls={shards}",
            f"callbacks.samples.prompts=[{CAPTION}]")  # fmt: skip
    cfg = compose(list(args))
    proc = run_cli(main, ["ldm-train", *args])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return Path(cfg.paths.run_dir), cfg


@pytest.fixture(scope="module")
def wan_run(tmp_path_factory, wan_shards):
    return train(tmp_path_factory.mktemp("wan"), WAN, wan_shards)


@pytest.fixture(scope="module")
def i2v_run(tmp_path_factory, wan_shards):
    return train(tmp_path_factory.mktemp("wan_i2v"), I2V, wan_shards)


def test_clips_are_encoded_whole_and_normalised_per_channel():
    vae = tiny_vae()
    clips = torch.rand(2, 3, 5, 32, 32) * 2 - 1
    with torch.no_grad():
        posterior = posterior_of(vae, clips)
        # Causal: the first latent frame is the first frame's alone.
        first = vae.encode(clips[:, :, :1]).latent_dist.mean
    assert posterior.mean.shape == (2, 16, 2, 4, 4)  # 1 + (5 - 1) / 4 latent frames, 32 / 8
    torch.testing.assert_close(posterior.mean[:, :, :1], first, atol=1e-5, rtol=1e-4)
    z = posterior.mean
    normed = normalize_latents(vae, z)
    for c in (0, 7, 15):
        mean, std = vae.config.latents_mean[c], vae.config.latents_std[c]
        torch.testing.assert_close(normed[:, c], (z[:, c] - mean) / std)


def test_first_frame_inputs_are_the_i2v_pipelines(tmp_path):
    """Training's conditioning for image-to-video equals what WanImageToVideoPipeline makes from
    the same first frame (mask channels, then the normalised latents of frame + black frames)."""
    from transformers import AutoModel, AutoTokenizer

    from train.models.conditioners.text import minilm_dir

    vae = tiny_vae()
    pipe = WanImageToVideoPipeline(
        tokenizer=AutoTokenizer.from_pretrained(minilm_dir()),
        text_encoder=AutoModel.from_pretrained(minilm_dir()), vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(), transformer=tiny_transformer(36))  # fmt: skip
    clip = torch.rand(1, 3, 9, 32, 32) * 2 - 1
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        _, condition = pipe.prepare_latents(clip[:, :, 0], 1, 16, 32, 32, 9, torch.float32,
                                            torch.device("cpu"), generator)  # fmt: skip

    class Module:
        pass

    module = Module()
    module.vae = vae
    mine = first_frame.inputs(module, {"pixel_values": clip})
    assert mine.shape == (1, 4 + 16, 3, 4, 4)
    torch.testing.assert_close(mine, condition, atol=1e-5, rtol=1e-4)
    assert mine[:, :4, 0].eq(1).all() and mine[:, :4, 1:].eq(0).all()


def test_text_to_video_export_loads_in_wanpipeline_and_makes_clips(wan_run):
    run_dir, cfg = wan_run
    pipe = WanPipeline.from_pretrained(run_dir / "export")
    assert isinstance(pipe.transformer, WanTransformer3DModel)
    assert isinstance(pipe.vae, AutoencoderKLWan)
    fresh = instantiate(cfg.model.backbone.model).state_dict()
    trained = pipe.transformer.state_dict()
    assert any(not torch.equal(fresh[k], trained[k]) for k in fresh)
    for frames in (5, 9):
        out = pipe([CAPTION], num_frames=frames, height=32, width=32, num_inference_steps=2,
                   max_sequence_length=24, generator=torch.Generator().manual_seed(0),
                   output_type="pt").frames  # fmt: skip
        assert out.shape == (1, frames, 3, 32, 32)
        assert torch.isfinite(out).all() and out.std() > 0
    with av.open(str(run_dir / "samples" / "final.mp4")) as container:
        assert len(list(container.decode(video=0))) == 5


def test_image_to_video_export_loads_in_its_pipeline(i2v_run):
    run_dir, _ = i2v_run
    pipe = WanImageToVideoPipeline.from_pretrained(run_dir / "export")
    assert pipe.transformer.config.in_channels == 36 and pipe.image_encoder is None
    image = Image.new("RGB", (32, 32), (255, 0, 0))
    out = pipe(image=image, prompt=[CAPTION], num_frames=5, height=32, width=32,
               num_inference_steps=2, max_sequence_length=24,
               generator=torch.Generator().manual_seed(0), output_type="pt").frames  # fmt: skip
    assert out.shape == (1, 5, 3, 32, 32) and torch.isfinite(out).all()
    assert Image.open(run_dir / "samples" / "final.png").size == (5 * 32, 32)


def test_ldm_sample_writes_wan_clips(wan_run, i2v_run, tmp_path):
    from train.cli.sample import main

    out = tmp_path / "clip.mp4"
    export = str(wan_run[0] / "export")
    proc = run_cli(main, ["ldm-sample", export, "--prompt", CAPTION, "--frames", "9",
                          "--size", "32", "--steps", "2", "--out", str(out)])  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    with av.open(str(out)) as container:
        frames = list(container.decode(video=0))
    assert len(frames) == 9 and (frames[0].width, frames[0].height) == (32, 32)
    first = tmp_path / "first.png"
    Image.new("RGB", (32, 32), (0, 0, 255)).save(first)
    strip = tmp_path / "strip.png"
    proc = run_cli(main, ["ldm-sample", str(i2v_run[0] / "export"), "--prompt", CAPTION,
                          "--init-image", str(first), "--frames", "5", "--size", "32",
                          "--steps", "2", "--vae-tiling", "24", "--out", str(strip)])  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert Image.open(strip).size == (5 * 32, 32)


@pytest.mark.parametrize(
    ("which", "args", "needle"),
    [
        ("t2v", ["--frames", "5"], "does not record the size it was trained at: give --size"),
        ("i2v", ["--size", "32"], "give the clips' first frame with --init-image IMAGE"),
    ],
)
def test_ldm_sample_refuses_what_a_wan_export_needs(which, args, needle, wan_run, i2v_run):
    from train.cli.sample import main

    export = (wan_run if which == "t2v" else i2v_run)[0] / "export"
    proc = run_cli(main, ["ldm-sample", str(export), "--prompt", "x", *args])
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr


def test_the_from_pretrained_configs_train_from_an_export(wan_run, wan_shards, tmp_path):
    """model/backbone=wan and model/vae=wan (the Wan 2.1 hub folders by default) on a local
    export: the transformer starts from its weights."""
    export = wan_run[0] / "export"
    args = (*WAN, "model/backbone=wan", "model/vae=wan",
            f"model.backbone.model.pretrained_model_name_or_path={export}",
            f"model.vae.pretrained_model_name_or_path={export}",
            "model.backbone.gradient_checkpointing=false", "trainer.max_steps=1")  # fmt: skip
    run_dir, _ = train(tmp_path, args, wan_shards)
    assert (run_dir / "export" / "transformer" / "config.json").is_file()


def test_frame_counts_the_vae_cannot_take_name_the_nearest():
    assert nearest_frame_counts(6, 4) == [5, 9] and nearest_frame_counts(10, 4) == [9, 13]
    backbone = WanBackbone(tiny_transformer(), resolution=32, num_frames=7)
    with pytest.raises(ConfigError, match=re.escape("takes 4k+1 frames; the nearest valid counts "
                                                    "are 5 or 9")):  # fmt: skip
        backbone.check_temporal_factor(4)
    i2v = WanImageToVideoBackbone(tiny_transformer(16), resolution=32, num_frames=5)
    with pytest.raises(ConfigError, match=re.escape("model.backbone.model.in_channels=36")):
        i2v.check_temporal_factor(4)
    with pytest.raises(ConfigError, match="multiple of 16"):
        WanBackbone(tiny_transformer(), resolution=40).check_scale_factor(8)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (("data.video.num_frames=6",), "the nearest valid counts are 5 or 9"),
        (("data.video.num_frames=9",), "is long enough for a clip of data.video.num_frames=9 "
                                       "at 8 fps (it needs 1.12 s; they last 0.62-0.62 s)"),
        (("data.video=null",), "these are video shards: read them with +data/video=clips"),
        # 5 frames x 32 x 32 = 5,120 frame pixels a clip
        (("batch.max_pixels_per_device=5000",), "batch.max_pixels_per_device=5,000 is below "
                                                "one sample's 5,120 frame pixels (5 frames"),
    ],
)
def test_settings_wan_cannot_take_are_refused_before_a_start(overrides, needle, wan_shards):
    from train.config.checks import early_checks

    cfg = compose([*WAN, f"data.urls={wan_shards}", *overrides])
    with pytest.raises(ConfigError, match=re.escape(needle)):
        early_checks(cfg, run_dir=False)


def test_a_motion_unet_over_a_video_vae_is_refused(wan_shards, tmp_path):
    from train.cli.train import main

    args = [f"paths.root={tmp_path}", "experiment=motion_tiny", "logger=none",
            "model/vae=wan_tiny", f"data.urls={wan_shards}", "data.resolution=32",
            "model.backbone.unet.sample_size=4", "model.backbone.unet.in_channels=16",
            "model.backbone.unet.out_channels=16"]  # fmt: skip
    proc = run_cli(main, ["ldm-train", *args])
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "the VAE compresses time 4x, but AnimateDiff's motion modules" in proc.stderr
    assert "the VAE compresses time 4x" in proc.stderr
