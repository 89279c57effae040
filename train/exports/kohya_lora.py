"""A UNet's peft LoRA in the kohya layout that A1111, ComfyUI and diffusers' kohya loader read.

Keys are ``lora_unet_<module path, dots as underscores>.lora_down.weight`` / ``.lora_up.weight``
/ ``.alpha``, the names ComfyUI's ``model_lora_keys_unet`` (comfy/lora.py) maps from the
diffusers key of each UNet weight. Written by hand, not with diffusers'
``convert_state_dict_to_kohya``: that helper stores alpha = rank whatever the trained alpha (a
LoRA trained with alpha != rank would load at the wrong strength) and leaves a UNet's DoRA
magnitude under peft's name, which those tools ignore.
"""

from __future__ import annotations

import torch
from torch import nn

from train.models.adapters import ADAPTER, adapter_config, has_adapter, is_lora

PREFIX = "lora_unet"


def kohya_problem(model: nn.Module) -> str | None:
    """Why ``model``'s adapter has no kohya form, or None when it has one."""
    if not has_adapter(model):
        return "the model has no adapter (model.backbone.adapter)"
    if not is_lora(model):
        return f"the kohya format holds LoRA adapters, not {type(adapter_config(model)).__name__}"
    config = adapter_config(model)
    if config.use_dora:
        # The tools disagree on what dora_scale means: diffusers' SD loader drops it, and ComfyUI
        # divides by the base weight's norm where peft divides by the updated weight's.
        return "DoRA has no kohya form that every tool applies the same way"
    if getattr(config, "lora_bias", False):
        return "a LoRA with lora_bias has no kohya form (kohya's modules have no bias)"
    return None


def kohya_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter of a UNet (``model``, a diffusers model with a peft LoRA) as kohya keys, with
    each module's alpha = its scale x rank, so that the tools' alpha / rank is the trained scale
    (also under peft's rank_pattern, alpha_pattern and rsLoRA)."""
    from peft.tuners.lora import LoraLayer

    problem = kohya_problem(model)
    if problem:
        raise ValueError(problem)
    state: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or ADAPTER not in module.lora_A:
            continue
        key = f"{PREFIX}_{name.replace('.', '_')}"
        down = module.lora_A[ADAPTER].weight  # [r, in] (a conv's: [r, in, kh, kw])
        up = module.lora_B[ADAPTER].weight  # [out, r] (a conv's: [out, r, 1, 1])
        rank = down.shape[0]
        state[f"{key}.lora_down.weight"] = down.detach().float().contiguous().cpu()
        state[f"{key}.lora_up.weight"] = up.detach().float().contiguous().cpu()
        state[f"{key}.alpha"] = torch.tensor(float(module.scaling[ADAPTER]) * rank)
    if not state:
        raise ValueError("the adapter has no LoRA layers to write")
    return state


def kohya_metadata(model: nn.Module, base: str | None) -> dict[str, str]:
    """The safetensors header kohya's trainer writes (the fields A1111's and ComfyUI's LoRA
    browsers show): network module, rank and alpha, and the base model."""
    config = adapter_config(model)
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(config.r),
        "ss_network_alpha": str(config.lora_alpha),
        "ss_training_comment": "written by ldm-pipeline from a peft LoRA",
    }
    if base:
        meta["ss_sd_model_name"] = str(base)
    return meta
