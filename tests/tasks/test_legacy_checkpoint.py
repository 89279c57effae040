"""A checkpoint written before the backbone/conditioner/objective seams (commit 48d72b2, see
tests/fixtures/legacy_v0/README.md) still exports: the same weights, every part, and the
export loads and samples in diffusers."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from train.cli.export import export_checkpoint

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "legacy_v0"


def test_a_checkpoint_from_before_the_seams_exports_what_it_did(tmp_path: Path) -> None:
    expected = json.loads((FIXTURE / "expected.json").read_text())
    out = export_checkpoint(FIXTURE / "last.ckpt", tmp_path / "export")
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == sorted(expected["files"])
    for part in ("unet", "vae", "text_encoder"):
        (weights,) = (out / part).glob("*.safetensors")
        state = load_file(weights)
        total = sum(float(v.double().sum()) for v in state.values())
        assert abs(total - expected[f"{part}_sum"]) < 1e-6, part
    unet = load_file(next((out / "unet").glob("*.safetensors")))
    assert sum(v.numel() for v in unet.values()) == expected["unet_numel"]

    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(["a red circle"], num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    assert image.shape == (1, 16, 16, 3)
