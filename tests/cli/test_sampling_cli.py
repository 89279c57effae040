"""`ldm-sample` and `ldm-eval` on one tiny trained export: grid sizes, seeding, the pickle guard,
and the held-out accuracy report."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from train.cli.evaluate import evaluate_export
from train.cli.sample import load_pipeline, main

PROMPTS = (
    "a red circle at the top left on a white background",
    "a blue square in the center on a black background",
)


@pytest.fixture
def export(tiny_run) -> Path:
    """The session's tiny run's export (16 px)."""
    run_dir, cfg = tiny_run
    assert cfg.data.resolution == 16
    return run_dir / "export"


def sample_grid(export: Path, out: Path, *args: str) -> np.ndarray:
    argv = [str(export), "--out", str(out), "--num-per-prompt", "2", "--steps", "2", *args]
    for prompt in PROMPTS:
        argv += ["--prompt", prompt]
    main(argv)
    with Image.open(out) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("scheduler", ["dpm++", "ddim"])
def test_sample_writes_a_grid_of_the_expected_size(export, tmp_path, scheduler):
    out = tmp_path / "nested" / "grid.png"
    grid = sample_grid(export, out, "--scheduler", scheduler)
    # 2 prompts x 2 samples each at 16 px: one row per prompt, one column per sample.
    assert grid.shape == (32, 32, 3)
    tiles = [grid[r : r + 16, c : c + 16] for r in (0, 16) for c in (0, 16)]
    assert all(tile.std() > 0 for tile in tiles)  # every tile holds an image, not the background


def test_same_seed_same_images_other_seed_different(export, tmp_path):
    a = sample_grid(export, tmp_path / "a.png", "--seed", "7")
    b = sample_grid(export, tmp_path / "b.png", "--seed", "7")
    c = sample_grid(export, tmp_path / "c.png", "--seed", "8")
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_pickle_weights_are_refused_unless_allowed(export, tmp_path):
    pickled = tmp_path / "pickled"
    shutil.copytree(export, pickled)
    unet_dir = pickled / "unet"
    safetensors = unet_dir / "diffusion_pytorch_model.safetensors"
    state = load_file(safetensors)
    torch.save(state, unet_dir / "diffusion_pytorch_model.bin")
    safetensors.unlink()

    # use_safetensors=True: diffusers refuses the folder instead of unpickling the .bin.
    with pytest.raises(OSError, match=r"no file named diffusion_pytorch_model\.safetensors"):
        load_pipeline(pickled)

    pipe = load_pipeline(pickled, allow_pickle=True)
    loaded = pipe.unet.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_load_pipeline_refuses_a_folder_that_is_not_an_export(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_pipeline(tmp_path)


def test_evaluate_export_reports_accuracies(export):
    scores = evaluate_export(export, num_samples=4, steps=2)
    for key in ("colour", "shape", "position", "background", "all"):
        assert 0.0 <= scores[key] <= 1.0, (key, scores)
        assert scores[key] * 4 == round(scores[key] * 4)  # a fraction of the 4 samples
    assert scores["all"] <= min(scores[k] for k in ("colour", "shape", "position", "background"))
    assert scores["num_samples"] == 4
    assert scores["num_heldout_captions"] == 4


def test_a_long_prompt_gets_one_short_line_of_ours(export, tmp_path):
    """Not diffusers' warning, which names CLIP whatever the encoder and echoes the prompt."""
    from cli_runner import run_cli

    long = " ".join(["a red circle"] * 10)  # 30 words + [CLS] and [SEP]
    argv = ["ldm-sample", str(export), "--prompt", PROMPTS[0], "--prompt", long, "--steps", "1",
            "--out", str(tmp_path / "grid.png")]  # fmt: skip
    proc = run_cli(main, argv)
    assert proc.returncode == 0, proc.stderr
    assert [line for line in proc.stderr.splitlines() if "token" in line] == [
        "ldm-sample: prompt 2 is 32 tokens; the text encoder reads the first 24 "
        "(model.conditioner.tokenizer.model_max_length at training)"
    ]
    assert "because CLIP" not in proc.stderr and "red circle a red" not in proc.stderr


def test_sampling_prints_what_it_wrote_and_no_library_notes(export, tmp_path):
    """No loading bars, no accelerate advert, no CLIP type hint for the MiniLM encoder."""
    from cli_runner import run_cli

    out = tmp_path / "grid.png"
    proc = run_cli(main, ["ldm-sample", str(export), "--prompt", PROMPTS[0], "--steps", "1",
                          "--out", str(out)])  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"wrote 1 samples to {out}"]
    assert proc.stderr == ""
