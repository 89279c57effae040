"""One-file checkpoints (UNet + VAE + text encoders in the original LDM / SGM layout) of
SD-1.x, SD-2.x and SDXL pipelines: the files A1111 and ComfyUI load from their checkpoint folder.

Those tools build the model from a fixed architecture they recognise by the checkpoint's keys
and shapes (A1111's v1/v2/sd_xl yaml configs, ComfyUI's ``model_detection`` against
``supported_models``), so a pipeline of another shape is refused unless the caller asks for the
layout anyway (diffusers' ``from_single_file(..., config=<the export>)`` loads any shape).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from train.exports import ldm_layout
from train.util import atomic_file

# What the tools' fixed configs require, as diffusers config values (UNet, VAE, text encoders).
SD_VAE = {"block_out_channels": (128, 256, 512, 512), "latent_channels": 4, "layers_per_block": 2}
SD_UNET = {"block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2,
           "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
           "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
           "out_channels": 4, "addition_embed_type": None}  # fmt: skip
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "SD-1.x": {"unet": {**SD_UNET, "cross_attention_dim": 768, "use_linear_projection": False,
                        "attention_head_dim": 8},
               "text_encoders": (("CLIPTextModel", 768),)},
    "SD-2.x": {"unet": {**SD_UNET, "cross_attention_dim": 1024, "use_linear_projection": True,
                        "attention_head_dim": (5, 10, 20, 20)},
               "text_encoders": (("CLIPTextModel", 1024),)},
    "SDXL": {"unet": {"block_out_channels": (320, 640, 1280), "layers_per_block": 2,
                      "transformer_layers_per_block": (1, 2, 10), "cross_attention_dim": 2048,
                      "addition_embed_type": "text_time", "use_linear_projection": True,
                      "out_channels": 4},
             "text_encoders": (("CLIPTextModel", 768), ("CLIPTextModelWithProjection", 1280))},
}  # fmt: skip
# Where each architecture's text encoders go, and in which layout (HF CLIP keys or OpenCLIP's).
TEXT_PREFIXES = {
    "SD-1.x": (("cond_stage_model.transformer.", "clip"),),
    "SD-2.x": (("cond_stage_model.model.", "openclip"),),
    "SDXL": (("conditioner.embedders.0.transformer.", "clip"),
             ("conditioner.embedders.1.model.", "openclip")),
}  # fmt: skip
PIPELINES = {"StableDiffusionPipeline": ("SD-1.x", "SD-2.x"),
             "StableDiffusionInpaintPipeline": ("SD-1.x", "SD-2.x"),
             "StableDiffusionXLPipeline": ("SDXL",),
             "StableDiffusionXLInpaintPipeline": ("SDXL",)}  # fmt: skip


def _same(value: Any, want: Any) -> bool:
    """Config equality that takes a list for the tuple it was saved from."""

    def norm(v: Any) -> Any:
        return tuple(v) if isinstance(v, list | tuple) else v

    return norm(value) == norm(want)


def _mismatch(pipe: Any, arch: str) -> str | None:
    """The first setting of `pipe` that differs from architecture `arch`, or None."""
    spec = ARCHITECTURES[arch]
    for key, want in spec["unet"].items():
        got = pipe.unet.config.get(key)
        if not _same(got, want):
            return f"unet.{key} is {got}, {arch} has {want}"
    for key, want in SD_VAE.items():
        got = pipe.vae.config.get(key)
        if not _same(got, want):
            return f"vae.{key} is {got}, {arch} has {want}"
    for name, (cls, width) in zip(text_encoder_names(arch), spec["text_encoders"], strict=True):
        encoder = getattr(pipe, name, None)
        got = (type(encoder).__name__, getattr(getattr(encoder, "config", None), "hidden_size", 0))
        if got != (cls, width):
            return f"{name} is {got[0]} of width {got[1]}, {arch} has {cls} of width {width}"
    return None


def text_encoder_names(arch: str) -> tuple[str, ...]:
    return ("text_encoder", "text_encoder_2")[: len(TEXT_PREFIXES[arch])]


def architecture(pipe: Any) -> tuple[str | None, str | None]:
    """(the architecture A1111 and ComfyUI would see in `pipe`, None) or (None, why none)."""
    kind = type(pipe).__name__
    if kind not in PIPELINES:
        return None, (f"{kind} has no single-file layout here (SD-1.x, SD-2.x and SDXL "
                      "pipelines only); ComfyUI loads SD3's and Flux's diffusers folders as they "
                      "are")  # fmt: skip
    reasons = []
    for arch in PIPELINES[kind]:
        why = _mismatch(pipe, arch)
        if why is None:
            return arch, None
        reasons.append(why)
    return None, "; ".join(reasons)


def layout_family(pipe: Any) -> str:
    """The family whose key layout `pipe` is written in (by its pipeline class and encoder)."""
    arch, _ = architecture(pipe)
    if arch is not None:
        return arch
    if type(pipe).__name__.startswith("StableDiffusionXL"):
        return "SDXL"
    width = pipe.unet.config.get("cross_attention_dim")
    return "SD-1.x" if not pipe.unet.config.get("use_linear_projection") and width else "SD-2.x"


def state(pipe: Any, family: str) -> dict[str, torch.Tensor]:
    """The whole single-file state dict of `pipe` in `family`'s layout."""
    out = {f"model.diffusion_model.{k}": v for k, v in
           ldm_layout.unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config).items()}  # fmt: skip
    out |= {f"first_stage_model.{k}": v for k, v in
            ldm_layout.vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config).items()}  # fmt: skip
    for name, (prefix, layout) in zip(text_encoder_names(family), TEXT_PREFIXES[family],
                                      strict=True):  # fmt: skip
        encoder = getattr(pipe, name)
        kind = type(encoder).__name__
        if not kind.startswith("CLIPTextModel"):
            raise ValueError(f"{name} is a {kind}: the single-file layout holds CLIP text "
                             "encoders only")  # fmt: skip
        weights = encoder.state_dict()
        if not hasattr(encoder, "text_model"):
            # transformers >= 5.6 flattened CLIPTextModel; the files keep the `text_model.` level.
            weights = {f"text_model.{k}": v for k, v in weights.items()}
        if layout == "openclip":
            weights = ldm_layout.openclip_to_ldm(weights)
        out |= {prefix + k: v for k, v in weights.items()}
    if pipe.scheduler.config.get("prediction_type") == "v_prediction":
        out["v_pred"] = torch.tensor([])  # ComfyUI's own mark of a v-prediction checkpoint
    # Meta tensors (shapes only) stay where they are: the tests check full-size layouts so.
    return {k: v.detach().contiguous() if v.is_meta else v.detach().contiguous().cpu()
            for k, v in out.items()}  # fmt: skip


def write(pipe: Any, out_file: str | Path, any_shape: bool = False) -> tuple[Path, str]:
    """Write `pipe` as one safetensors file, atomically (a crash leaves any earlier file as it
    was); returns the path and the architecture. ValueError, before anything is written, for a
    pipeline A1111 and ComfyUI cannot load (unless `any_shape`: the layout still loads in
    diffusers' ``from_single_file(..., config=<export>)``)."""
    from safetensors.torch import save_file

    arch, why = architecture(pipe)
    if arch is None and not (any_shape and type(pipe).__name__ in PIPELINES):
        raise ValueError(f"A1111 and ComfyUI cannot load this model: {why}. Load its diffusers "
                         "export as it is (from_pretrained, ComfyUI's diffusers loader), or "
                         "pass --any-shape for a file only diffusers' from_single_file(config="
                         "<export>) reads")  # fmt: skip
    family = arch or layout_family(pipe)
    weights = state(pipe, family)
    with atomic_file(out_file) as tmp:
        save_file(weights, str(tmp), metadata={"format": "pt",
                                               "ldm_architecture": arch or "custom"})  # fmt: skip
    return Path(out_file), arch or f"custom ({family} layout)"
