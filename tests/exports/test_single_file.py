"""`ldm-export --format single-file`: the LDM / SGM key layout that A1111 and ComfyUI load.

Full-size SD-1.x, SD-2.x and SDXL pipelines are built on the meta device (real shapes, no
memory): diffusers' own single-file code must recognise each written state dict as that model
and convert every key back to the pipeline's. A tiny SDXL export round-trips through
`StableDiffusionXLPipeline.from_single_file(..., config=export)` with equal weights and images
(1e-5), and shapes those tools cannot load are refused, naming the setting."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runner import run_cli
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders.single_file_utils import (
    CHECKPOINT_KEY_NAMES,
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
    infer_diffusers_model_type,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from train.cli.export import main as ldm_export
from train.exports import single_file
from train.models.conditioners.tiny_tokenizers import tiny_clip_tokenizer

SD_VAE = dict(block_out_channels=(128, 256, 512, 512), latent_channels=4, layers_per_block=2,
              down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4)  # fmt: skip
SDXL_UNET = dict(sample_size=128, block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                 cross_attention_dim=2048, use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)  # fmt: skip


def clip(width: int, layers: int, heads: int, projection: int | None = None):
    config = CLIPTextConfig(
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        projection_dim=projection or width,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def meta_pipeline(arch: str):
    """A full-size pipeline of `arch` on the meta device (shapes only)."""
    tokenizer = CLIPTokenizer.from_pretrained(tiny_clip_tokenizer())
    with torch.device("meta"):
        vae = AutoencoderKL(**SD_VAE)
        if arch == "SDXL":
            parts = dict(unet=UNet2DConditionModel(**SDXL_UNET), text_encoder=clip(768, 12, 12),
                         text_encoder_2=clip(1280, 32, 20, projection=1280),
                         tokenizer_2=tokenizer)  # fmt: skip
            return StableDiffusionXLPipeline(
                vae=vae, tokenizer=tokenizer, scheduler=DDIMScheduler(), **parts
            )
        if arch == "SD-1.x":
            unet, encoder = UNet2DConditionModel(cross_attention_dim=768), clip(768, 12, 12)
        else:
            unet = UNet2DConditionModel(cross_attention_dim=1024, use_linear_projection=True,
                                        attention_head_dim=(5, 10, 20, 20))  # fmt: skip
            encoder = clip(1024, 23, 16)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def same_keys_and_shapes(got: dict, want: dict) -> None:
    assert got.keys() == want.keys(), (sorted(got.keys() - want.keys())[:3],
                                       sorted(want.keys() - got.keys())[:3])  # fmt: skip
    assert all(got[k].shape == want[k].shape for k in want)


@pytest.mark.parametrize(("arch", "diffusers_name"),
                         [("SD-1.x", "v1"), ("SD-2.x", "v2"), ("SDXL", "xl_base")])  # fmt: skip
def test_full_size_layouts_are_recognised_and_convert_back(arch, diffusers_name) -> None:
    pipe = meta_pipeline(arch)
    assert single_file.architecture(pipe) == (arch, None)
    state = single_file.state(pipe, arch)
    assert infer_diffusers_model_type(state) == diffusers_name
    same_keys_and_shapes(convert_ldm_unet_checkpoint(state, pipe.unet.config),
                         pipe.unet.state_dict())  # fmt: skip
    same_keys_and_shapes(convert_ldm_vae_checkpoint(state, pipe.vae.config), pipe.vae.state_dict())
    if arch == "SD-2.x":
        assert CHECKPOINT_KEY_NAMES["open_clip"] in state
        back = convert_open_clip_checkpoint(pipe.text_encoder, state)
    else:
        clip_key = CHECKPOINT_KEY_NAMES["clip_sdxl" if arch == "SDXL" else "clip"]
        assert clip_key in state  # the files' `text_model.` level, whatever transformers does
        back = convert_ldm_clip_checkpoint(state)
    same_keys_and_shapes(flattened_like(pipe.text_encoder, back), pipe.text_encoder.state_dict())
    if arch == "SDXL":
        back = convert_open_clip_checkpoint(pipe.text_encoder_2, state,
                                            prefix="conditioner.embedders.1.model.")  # fmt: skip
        same_keys_and_shapes(back, pipe.text_encoder_2.state_dict())


def flattened_like(encoder, state: dict) -> dict:
    """`state` as diffusers loads it into `encoder` (transformers >= 5.6 flattened
    CLIPTextModel: no `text_model.` level)."""
    if hasattr(encoder, "text_model"):
        return state
    return {k.removeprefix("text_model."): v for k, v in state.items()}


@pytest.fixture(scope="module")
def sdxl_export(tmp_path_factory, demo_shards) -> Path:
    """The tiny SDXL family's export, random init (every weight differs from its neighbours)."""
    from hydra.utils import instantiate

    from train.config.compose import compose

    root = tmp_path_factory.mktemp("sdxl")
    cfg = compose([f"paths.root={root}", "experiment=sdxl_tiny", f"data.urls={demo_shards}"])
    torch.manual_seed(0)
    module = instantiate(cfg.model).eval()
    return module.export(root / "export")


def test_tiny_sdxl_round_trips_through_from_single_file(sdxl_export, tmp_path) -> None:
    out = tmp_path / "model.safetensors"
    proc = run_cli(ldm_export, ["ldm-export", str(sdxl_export), str(out), "--format",
                                "single-file"])  # fmt: skip
    assert proc.returncode != 0 and not out.exists()
    assert "A1111 and ComfyUI cannot load this model: unet.block_out_channels is [32, 64], " \
        "SDXL has (320, 640, 1280)" in proc.stderr, proc.stderr  # fmt: skip
    proc = run_cli(ldm_export, ["ldm-export", str(sdxl_export), str(out), "--format",
                                "single-file", "--any-shape"])  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "custom (SDXL layout) single-file checkpoint" in proc.stdout

    loaded = StableDiffusionXLPipeline.from_single_file(str(out), config=str(sdxl_export),
                                                        local_files_only=True)  # fmt: skip
    saved = StableDiffusionXLPipeline.from_pretrained(sdxl_export)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        want, got = getattr(saved, name).state_dict(), getattr(loaded, name).state_dict()
        assert got.keys() == want.keys(), name
        assert all(torch.equal(got[k], want[k]) for k in want), name

    def images(pipe) -> np.ndarray:
        pipe.set_progress_bar_config(disable=True)
        return pipe("a red circle", num_inference_steps=2, height=16, width=16, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images  # fmt: skip

    # Bit-equal weights; the text encoders' attention kernel may differ between the two loaders.
    np.testing.assert_allclose(images(loaded), images(saved), rtol=0, atol=1e-5)


def test_what_has_no_single_file_form_is_refused_naming_it(tiny_run, tmp_path) -> None:
    export = tiny_run[0] / "export"  # SD layout, a MiniLM text encoder
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"an earlier export")  # a refused export leaves it as it was
    for extra, message in (
        ([], "unet.block_out_channels is [32, 64], SD-1.x has (320, 640, 1280, 1280)"),
        (["--any-shape"], "text_encoder is a BertModel: the single-file layout holds CLIP"),
    ):
        proc = run_cli(ldm_export, ["ldm-export", str(export), str(out), "--format",
                                    "single-file", *extra])  # fmt: skip
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr
        assert out.read_bytes() == b"an earlier export"
    proc = run_cli(ldm_export, ["ldm-export", str(export), str(tmp_path / "dir"), "--format",
                                "single-file"])  # fmt: skip
    assert proc.returncode != 0 and "name OUT like model.safetensors" in proc.stderr
    proc = run_cli(ldm_export, ["ldm-export", str(export), str(tmp_path / "x"), "--any-shape"])
    assert proc.returncode != 0 and "--any-shape applies to --format single-file" in proc.stderr


def test_a_write_that_fails_midway_keeps_the_earlier_file(tmp_path) -> None:
    """`train.util.atomic_file`, which single-file exports and reference statistics write
    through: the new bytes replace the file only once they are all written."""
    from train.util import atomic_file

    out = tmp_path / "model.safetensors"
    out.write_bytes(b"earlier")
    with pytest.raises(RuntimeError, match="disk gone"), atomic_file(out) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("disk gone")
    assert out.read_bytes() == b"earlier" and sorted(tmp_path.iterdir()) == [out]
    with atomic_file(out) as tmp:
        tmp.write_bytes(b"new")
    assert out.read_bytes() == b"new" and sorted(tmp_path.iterdir()) == [out]
