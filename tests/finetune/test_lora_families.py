"""LoRA presets for the other families (`experiment=lora_sdxl`, `lora_sd3`, `lora_flux`,
`lora_pixart`) from a pretrained
folder of that family (the tiny parts, saved first): the family pipeline's own
`load_lora_weights` on the run's `lora/` (and for SDXL on its kohya file) and the merged export
generate what the trained module's pipeline generates, and unlike the base; a LoRA on SD3's T5
tower (`adapter=lora_t5`) ends merged in `text_encoder_3` alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cli_runner import run_cli
from diffusers import DiffusionPipeline
from finetune_runs import finetune_overrides
from safetensors.torch import load_file

from train.cli.export import build_module, module_from_checkpoint
from train.config.compose import compose
from train.tasks.pipelines import scheduler_of

PROMPT = "a red circle at the top left on a white background"
# family: (the tiny base's experiment, extra overrides, kohya file written)
FAMILIES = {
    # With a LoRA on both text encoders too (lora_te1_ / lora_te2_ in the kohya file).
    "sdxl": ("sdxl_tiny", ("model/conditioner/adapter=lora",), True),
    # The tiny base's T5 length (model.conditioner.max_sequence_length); a LoRA on the CLIP
    # encoders too (SD3's two, Flux's one; T5 stays frozen).
    "sd3": ("sd3_tiny", ("model.conditioner.max_sequence_length=32",
                         "model/conditioner/adapter=lora"), False),
    # A LoRA on SD3's T5 tower alone (diffusers' LoRA format holds none: merged export only).
    "sd3_t5": ("sd3_tiny", ("model.conditioner.max_sequence_length=32",
                            "model/conditioner/adapter=lora_t5"), False),
    "flux": ("flux_tiny", ("model.conditioner.max_sequence_length=32",
                           "model.backbone.sample_size=8", "model/conditioner/adapter=lora"),
             False),
    # The tiny base encodes with MiniLM and trains by flow (PixArt-Sigma: T5 and DDPM).
    "pixart": ("pixart_tiny", ("model/conditioner=pretrained", "model/objective=flow_pretrained"),
               False),
}  # fmt: skip
# diffusers' PixArt pipeline has no load_lora_weights, its SD3 LoRA format no text_encoder_3
NO_LORA_LOADER = {"pixart", "sd3_t5"}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_run(request, tmp_path_factory, demo_shards) -> tuple[str, Path, Path]:
    """(family, base folder, run folder): a random tiny base of the family saved as a diffusers
    folder, and a 4-step LoRA run (rank 4, alpha 8) over it."""
    from train.cli.train import main

    family = request.param
    tiny, extra, _ = FAMILIES[family]
    cfg = compose([f"experiment={tiny}"])
    base = build_module(cfg.model, cfg.seed).export(tmp_path_factory.mktemp(family) / "base")
    preset = f"lora_{family.split('_')[0]}"
    args = finetune_overrides(preset, tmp_path_factory.mktemp(f"lora-{family}"), base,
                              demo_shards, "model.backbone.adapter.r=4",
                              "model.backbone.adapter.lora_alpha=8", *extra)  # fmt: skip
    proc = run_cli(main, ["ldm-train", *args])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return family, base, Path(compose(args).paths.run_dir)


def latents(pipe, kwargs: dict) -> torch.Tensor:
    """The pipeline's final latents for PROMPT (2 steps, a fixed seed), before the VAE;
    ``kwargs``: the call arguments the run's previews pass (T5 lengths, PixArt's binning)."""
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    out = pipe(PROMPT, num_inference_steps=2, guidance_scale=2.0, height=16, width=16,
               generator=generator, output_type="latent", **kwargs)  # fmt: skip
    return out.images


def test_the_family_pipeline_loads_the_lora_at_the_trained_strength(family_run) -> None:
    family, base, run = family_run
    module, _ = module_from_checkpoint(run / "checkpoints" / "last.ckpt")
    kwargs = {**module.backbone.pipeline_call_kwargs(),
              **getattr(module.conditioner, "pipeline_call_kwargs", dict)()}  # fmt: skip
    with torch.no_grad():
        # With the scheduler the export writes (previews may sample with another).
        scheduler = scheduler_of(module.objective, module.objective.export_scheduler)
        trained = latents(module.pipeline(scheduler), kwargs)
        pipe = DiffusionPipeline.from_pretrained(base)
        assert type(pipe).__name__ == module.backbone.pipeline_class
        assert (latents(pipe, kwargs) - trained).abs().max() > 1e-3  # the LoRA changed it
        folders = ("lora", "lora_kohya") if FAMILIES[family][2] else ("lora",)
        assert (run / "lora").exists() == (family not in NO_LORA_LOADER)
        if family in NO_LORA_LOADER:
            folders = ()
        assert (run / "lora_kohya").exists() == FAMILIES[family][2]
        for folder in folders:
            pipe.load_lora_weights(run / folder)
            torch.testing.assert_close(latents(pipe, kwargs), trained, rtol=0, atol=1e-5)
            pipe.unload_lora_weights()
        if family == "sdxl":  # ComfyUI's SDXL names: clip_l as lora_te1_, clip_g as lora_te2_
            names = {k.split(".")[0] for k in load_file(run / "lora_kohya" / "lora.safetensors")}
            for te in ("lora_te1", "lora_te2"):
                assert any(n.startswith(f"{te}_text_model_encoder_layers_") for n in names)
        if "model/conditioner/adapter=lora" in FAMILIES[family][1]:  # the text LoRA trained
            state = load_file(run / "lora" / "pytorch_lora_weights.safetensors")
            parts = {k.split(".")[0] for k in state if k.startswith("text_encoder")}
            assert parts == ({"text_encoder"} if family == "flux" else
                             {"text_encoder", "text_encoder_2"})  # fmt: skip
            # Moved off zero in each encoder (not in every layer: a layer after the one whose
            # states the denoiser reads gets no gradient unless it feeds the pooled embedding).
            for part in parts:
                assert any(v.abs().max() > 0 for k, v in state.items()
                           if k.startswith(f"{part}.") and "lora_B" in k), part  # fmt: skip
        merged = DiffusionPipeline.from_pretrained(run / "export")
        torch.testing.assert_close(latents(merged, kwargs), trained, rtol=0, atol=1e-4)
    if family == "sd3_t5":  # the T5 tower's LoRA trained and is merged into text_encoder_3
        t5, t5_base = merged.text_encoder_3.state_dict(), pipe.text_encoder_3.state_dict()
        assert t5.keys() == t5_base.keys()  # merged: no LoRA layer left
        moved = {k for k in t5 if not torch.equal(t5[k], t5_base[k])}
        assert moved and all(k.rsplit(".", 2)[-2] in "qkvo" for k in moved), moved
        clip, clip_base = merged.text_encoder.state_dict(), pipe.text_encoder.state_dict()
        assert all(torch.equal(v, clip_base[k]) for k, v in clip.items())  # CLIP stayed frozen
