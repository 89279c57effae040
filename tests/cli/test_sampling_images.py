"""`ldm-sample --init-image / --strength / --mask` on the session's tiny export: the images are
the ones diffusers' own img2img and inpainting pipelines make from the same inputs and seed,
and bad image arguments are refused before any model loads, naming the flag."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runner import run_cli
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from train.cli.sample import load_pipeline, main

PROMPT = "a red circle at the top left on a white background"
SIZE = 16  # the tiny run's resolution


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("images")
    init = Image.new("RGB", (SIZE, SIZE), "white")
    ImageDraw.Draw(init).ellipse((2, 2, 9, 9), fill="red")
    mask = Image.new("L", (SIZE, SIZE), 0)
    ImageDraw.Draw(mask).rectangle((8, 8, 15, 15), fill=255)
    paths = {"init": root / "init.png", "mask": root / "mask.png", "rgb_mask": root / "rgb.png"}
    init.save(paths["init"])
    mask.save(paths["mask"])
    mask.convert("RGB").save(paths["rgb_mask"])
    # A LoHa in the kohya / LyCORIS layout: diffusers' kohya loader cannot apply it.
    paths["loha"] = root / "loha.safetensors"
    loha = {f"lora_unet_mid_block_attentions_0_proj_in.{k}": torch.ones(2, 2)
            for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}  # fmt: skip
    save_file({**loha, "lora_unet_mid_block_attentions_0_proj_in.alpha": torch.tensor(2.0)},
              str(paths["loha"]))  # fmt: skip
    return paths


def sample(export: Path, out: Path, *args: str) -> np.ndarray:
    argv = ["ldm-sample", str(export), "--prompt", PROMPT, "--steps", "4", "--seed", "3",
            "--out", str(out), *args]  # fmt: skip
    proc = run_cli(main, argv)
    assert proc.returncode == 0, proc.stderr
    with Image.open(out) as image:
        return np.asarray(image.convert("RGB"))


def direct(pipe, **kwargs) -> np.ndarray:
    """What diffusers' pipeline makes from the same prompt, steps and seed."""
    image = pipe(
        [PROMPT],
        num_inference_steps=4,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(3),
        **kwargs,
    ).images[0]
    return np.asarray(image)


def test_img2img_is_diffusers_img2img_at_the_given_strength(tiny_run, images, tmp_path) -> None:
    export = tiny_run[0] / "export"
    half = sample(export, tmp_path / "half.png", "--init-image", str(images["init"]),
                  "--strength", "0.5")  # fmt: skip
    full = sample(export, tmp_path / "full.png", "--init-image", str(images["init"]),
                  "--strength", "1.0")  # fmt: skip
    text = sample(export, tmp_path / "text.png")
    assert half.shape == (SIZE, SIZE, 3)
    pipe = StableDiffusionImg2ImgPipeline.from_pipe(load_pipeline(export))
    with Image.open(images["init"]) as init:
        want = direct(pipe, image=init.convert("RGB"), strength=0.5)
    np.testing.assert_array_equal(half, want)
    assert not np.array_equal(half, full) and not np.array_equal(half, text)


def test_inpainting_is_diffusers_inpainting_with_the_mask(tiny_run, images, tmp_path) -> None:
    export = tiny_run[0] / "export"
    got = sample(export, tmp_path / "inpaint.png", "--init-image", str(images["init"]),
                 "--mask", str(images["mask"]), "--strength", "0.75")  # fmt: skip
    pipe = StableDiffusionInpaintPipeline.from_pipe(load_pipeline(export))
    with Image.open(images["init"]) as init, Image.open(images["mask"]) as mask:
        want = direct(pipe, image=init.convert("RGB"), mask_image=mask.convert("L"),
                      strength=0.75, height=SIZE, width=SIZE)  # fmt: skip
    np.testing.assert_array_equal(got, want)
    img2img = sample(export, tmp_path / "i2i.png", "--init-image", str(images["init"]),
                     "--strength", "0.75")  # fmt: skip
    assert not np.array_equal(got, img2img)  # the mask changed what was repainted
    args = ("--init-image", str(images["init"]), "--mask", str(images["mask"]))
    kept = sample(export, tmp_path / "kept.png", *args, "--strength", "0.75", "--keep-unmasked")
    with Image.open(images["init"]) as init, Image.open(images["mask"]) as mask:
        outside, init = np.asarray(mask) == 0, np.asarray(init.convert("RGB"))
    assert not np.array_equal(got[outside], init[outside])  # the model alone changes them
    np.testing.assert_array_equal(kept[outside], init[outside])
    np.testing.assert_array_equal(kept[~outside], got[~outside])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--init-image", "{init}", "--strength", "0"], "--strength: 0.0 is outside (0, 1]"),
        (["--init-image", "{init}", "--strength", "1.5"], "--strength: 1.5 is outside (0, 1]"),
        (["--strength", "0.5"], "--strength applies to --init-image"),
        (["--mask", "{mask}"], "--mask needs --init-image"),
        (["--init-image", "{init}", "--mask", "{rgb_mask}"], "has 3 channels (RGB); a mask is one"),
        (["--init-image", "{missing}"], "--init-image {missing} is not a file"),
        (["--init-image", "{export}/model_index.json"], "is not an image PIL can read"),
        (["--lora", "{missing}"], "--lora {missing} is neither a .safetensors file"),
        (["--lora-scale", "0.5"], "--lora-scale needs --lora"),
        (["--init-image", "{init}", "--keep-unmasked"], "--keep-unmasked applies to inpainting"),
        (
            ["--init-image", "{init}", "--mask", "{mask}", "--mask-blur", "2"],
            "--mask-blur softens --keep-unmasked's seam",
        ),
        (["--lora", "{loha}"], "is a LoHa in the kohya / LyCORIS layout, which diffusers'"),
    ],
)
def test_bad_image_arguments_are_refused_naming_the_flag(
    tiny_run, images, tmp_path, args, message
) -> None:
    export = tiny_run[0] / "export"
    names = {k: str(v) for k, v in images.items()}
    names.update(missing=str(tmp_path / "nope.png"), export=str(export))
    out = tmp_path / "grid.png"
    argv = ["ldm-sample", str(export), "--prompt", PROMPT, "--out", str(out),
            *(a.format(**names) for a in args)]  # fmt: skip
    proc = run_cli(main, argv)
    assert proc.returncode != 0
    assert message.format(**names) in proc.stderr, proc.stderr
    assert not out.exists()
