"""Fine-tuning a UNet base trained by rectified flow (the demo's kind: DPM++ with flow sigmas in
its scheduler/): LoRA and inpainting train it by flow with the base's own shift and export the
base's sampler; the DDPM objective refuses such a base before training, naming the flow one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runner import run_cli
from diffusers import AutoPipelineForInpainting, DiffusionPipeline
from finetune_runs import finetune_overrides
from PIL import Image

from train.cli.export import build_module, module_from_checkpoint
from train.config.compose import compose
from train.objectives.flow import RectifiedFlow

PROMPT = "a red circle at the top left on a white background"
SHIFT = 2.5  # not the flow presets' default: a run that ignored the base's would show it


@pytest.fixture(scope="module")
def flow_base(tmp_path_factory) -> Path:
    """A tiny UNet pipeline configured for rectified flow, saved as a diffusers folder."""
    cfg = compose(["experiment=tiny", "model/objective=flow_dpm", f"model.objective.shift={SHIFT}"])
    return build_module(cfg.model, cfg.seed).export(tmp_path_factory.mktemp("flow") / "export")


def scheduler_config(folder: Path) -> dict:
    return json.loads((folder / "scheduler" / "scheduler_config.json").read_text())


@pytest.mark.parametrize("experiment", ["lora", "inpaint"])
def test_a_flow_base_fine_tunes_by_flow_and_exports_its_sampler(
    experiment, flow_base, demo_shards, tmp_path
) -> None:
    from train.cli.train import main

    args = finetune_overrides(experiment, tmp_path, flow_base, demo_shards,
                              "model/objective=flow_pretrained")  # fmt: skip
    proc = run_cli(main, ["ldm-train", *args])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = Path(compose(args).paths.run_dir)
    module, _ = module_from_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert isinstance(module.objective, RectifiedFlow) and module.objective.shift == SHIFT
    base, export = scheduler_config(flow_base), scheduler_config(run_dir / "export")
    assert export["_class_name"] == base["_class_name"] == "DPMSolverMultistepScheduler"
    assert {k: v for k, v in export.items() if not k.startswith("_")} == \
        {k: v for k, v in base.items() if not k.startswith("_")}  # fmt: skip
    assert base["use_flow_sigmas"] and base["flow_shift"] == SHIFT

    pipe = DiffusionPipeline.from_pretrained(run_dir / "export", safety_checker=None)
    kw: dict = {"num_inference_steps": 2, "output_type": "np", "height": 16, "width": 16}
    if experiment == "inpaint":
        pipe = AutoPipelineForInpainting.from_pipe(pipe)
        mask = np.zeros((16, 16), np.uint8)
        mask[4:12, 4:12] = 255
        kw |= {"image": Image.new("RGB", (16, 16), "white"), "mask_image": Image.fromarray(mask)}
    ours = module.pipeline(scheduler=pipe.scheduler)(PROMPT, generator=torch.manual_seed(0), **kw)
    theirs = pipe(PROMPT, generator=torch.manual_seed(0), **kw)
    assert np.isfinite(theirs.images).all() and theirs.images.std() > 0
    np.testing.assert_allclose(theirs.images, ours.images, atol=1e-5)


def test_the_ddpm_objective_refuses_a_flow_base_before_training(flow_base, demo_shards, tmp_path):
    from train.cli.train import main

    args = finetune_overrides("lora", tmp_path, flow_base, demo_shards)  # ddpm_pretrained
    proc = run_cli(main, ["ldm-train", *args])
    assert proc.returncode != 0
    assert "the base was trained by rectified flow; use model/objective=flow_pretrained" \
        in proc.stderr  # fmt: skip
    assert not (tmp_path / "runs" / "lora" / "checkpoints").exists()
