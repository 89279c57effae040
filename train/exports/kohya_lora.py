"""A UNet's peft adapter in the kohya / LyCORIS layout that A1111, ComfyUI and kohya's scripts read.

Keys are ``lora_unet_<module path, dots as underscores>.<weight>`` with a per-module ``alpha``:
``lora_down``/``lora_up`` for LoRA (plus ``dora_scale`` for DoRA), ``hada_w1_a``... for LoHa and
``lokr_w1``... for LoKr, the names ComfyUI's ``model_lora_keys_unet`` (comfy/lora.py) maps from
each UNet weight's diffusers key and LyCORIS' loader reads. Written by hand, not with diffusers'
``convert_state_dict_to_kohya``: that helper stores alpha = rank whatever the trained alpha (a
LoRA trained with alpha != rank would load at the wrong strength), leaves DoRA's magnitude under
peft's name, which those tools ignore, and has no LoHa or LoKr form.
"""

from __future__ import annotations

import json

import torch
from torch import nn

from train.models.adapters import ADAPTER, adapter_config, has_adapter

PREFIX = "lora_unet"
TEXT_PREFIX = "lora_te"  # SD 1.x/2.x's one text encoder (SDXL's two: lora_te1, lora_te2)
CLIP_TEXT_MODELS = ("CLIPTextModel", "CLIPTextModelWithProjection")
# The marks of the LyCORIS kinds (keys diffusers' kohya loader does not apply).
LYCORIS_MARKS = ("dora_scale", "hada_w1_a", "lokr_w1", "lokr_w1_a")
_LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
_LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def kohya_problem(model: nn.Module) -> str | None:
    """Why ``model``'s adapter has no kohya / LyCORIS form, or None when it has one."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    if not has_adapter(model):
        return "the model has no adapter (model.backbone.adapter)"
    config = adapter_config(model)
    if not isinstance(config, LoraConfig | LoHaConfig | LoKrConfig):
        return f"the kohya format holds LoRA, DoRA, LoHa and LoKr, not {type(config).__name__}"
    if getattr(config, "lora_bias", False):
        return "a LoRA with lora_bias has no kohya form (kohya's modules have no bias)"
    if getattr(config, "rank_dropout_scale", False):
        return "rank_dropout_scale changes the trained scale; the kohya format has no such key"
    return None


def text_prefix(model: nn.Module, part: str, encoders: int) -> str:
    """The kohya prefix of a CLIP text encoder's modules (``part``: its pipeline name, of
    ``encoders`` encoders with adapters): ``lora_te`` for SD's one, ``lora_te1`` / ``lora_te2``
    for SDXL's two; kohya names the layers from transformers 4's CLIP models, whose layers sit
    under ``text_model.``, a level transformers 5 dropped."""
    prefix = TEXT_PREFIX
    if encoders > 1 or part != "text_encoder":
        prefix += "2" if part == "text_encoder_2" else "1"
    return prefix if hasattr(model, "text_model") else f"{prefix}_text_model"


def text_encoder_problem(model: nn.Module) -> str | None:
    """Why a text encoder's adapter has no kohya form (None when it has one): the tools map
    ``lora_te_`` keys onto a CLIP text model's layers only."""
    kind = type(model).__name__
    if kind not in CLIP_TEXT_MODELS:
        return (f"the kohya format's text-encoder keys are a CLIP text model's; a {kind}'s "
                "adapter is written in the diffusers-lora format")  # fmt: skip
    return kohya_problem(model)


def kohya_state(model: nn.Module, prefix: str = PREFIX) -> dict[str, torch.Tensor]:
    """The adapter of a UNet (``model``, a diffusers model with a peft adapter; or with
    ``prefix="lora_te"`` a CLIP text encoder) in kohya keys, each module's alpha chosen so that
    the tools' alpha / rank is peft's trained scale (also under rank_pattern, alpha_pattern and
    rsLoRA)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    problem = kohya_problem(model)
    if problem:
        raise ValueError(problem)
    state: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer) and ADAPTER in module.scaling:
            key = f"{prefix}_{name.replace('.', '_')}"
            weights = _module_weights(module)
            state.update({f"{key}.{k}": v.detach().float().contiguous().cpu()
                          for k, v in weights.items()})  # fmt: skip
    if not state:
        raise ValueError("the adapter has no layers to write")
    return state


def _module_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """One peft layer's weights under the kohya / LyCORIS names, with its ``alpha``."""
    scale = float(module.scaling[ADAPTER])
    if hasattr(module, "lora_A"):
        return _lora_weights(module, scale)
    names = _LOHA if hasattr(module, "hada_w1_a") else _LOKR
    out = {n: getattr(module, n)[ADAPTER] for n in names if ADAPTER in getattr(module, n)}
    if "hada_w1_b" in out:
        rank = out["hada_w1_b"].shape[0]  # LyCORIS' LoHa: scale = alpha / w1_b's rows
    elif "lokr_w1_a" in out or "lokr_w2_a" in out:
        rank = out.get("lokr_w1_a", out.get("lokr_w2_a")).shape[1]  # LyCORIS: w1_a's or w2_a's
    else:
        # Both Kronecker factors whole: the tools take scale 1, so the scale goes into w1.
        out["lokr_w1"] = out["lokr_w1"] * scale
        scale, rank = 1.0, 1
    return {**out, "alpha": torch.tensor(scale * rank)}


def _lora_weights(module: nn.Module, scale: float) -> dict[str, torch.Tensor]:
    down = module.lora_A[ADAPTER].weight  # [r, in] (a conv's: [r, in, kh, kw])
    up = module.lora_B[ADAPTER].weight  # [out, r] (a conv's: [out, r, 1, 1])
    out = {"lora_down.weight": down, "lora_up.weight": up,
           "alpha": torch.tensor(scale * down.shape[0])}  # fmt: skip
    if module.use_dora.get(ADAPTER):
        # peft's magnitude [out] (a conv's [1, out, 1, 1]) is LyCORIS' output-axis dora_scale
        # [out, 1(, 1, 1)]: both divide by the norm of each output row of the updated weight
        # (Liu et al. 2024).
        magnitude = module.lora_magnitude_vector[ADAPTER].weight
        out["dora_scale"] = magnitude.reshape(up.shape[0], *[1] * (up.dim() - 1))
    return out


def kohya_metadata(model: nn.Module, base: str | None) -> dict[str, str]:
    """The safetensors header kohya's and LyCORIS' trainers write (the fields A1111's and
    ComfyUI's LoRA browsers show): network module and arguments, rank and alpha, the base."""
    config = adapter_config(model)
    kind = type(config).__name__
    algo = {"LoHaConfig": "loha", "LoKrConfig": "lokr"}.get(kind, "lora")
    dora = bool(getattr(config, "use_dora", False))
    lycoris = algo != "lora" or dora
    meta = {
        "ss_network_module": "lycoris.kohya" if lycoris else "networks.lora",
        "ss_network_dim": str(config.r),
        "ss_network_alpha": str(getattr(config, "lora_alpha", getattr(config, "alpha", ""))),
        "ss_training_comment": f"written by ldm-pipeline from a peft {kind}",
    }
    if lycoris:
        args = {"algo": algo, **({"dora_wd": "True", "wd_on_output": "True"} if dora else {})}
        meta["ss_network_args"] = json.dumps(args)
    if base:
        meta["ss_sd_model_name"] = str(base)
    return meta


def lycoris_kind(keys: list[str]) -> str | None:
    """The LyCORIS kind a kohya file's keys hold ("DoRA", "LoHa", "LoKr"), None for plain LoRA."""
    suffixes = {k.split(".", 1)[1] for k in keys if "." in k}
    for mark, kind in zip(LYCORIS_MARKS, ("DoRA", "LoHa", "LoKr", "LoKr"), strict=True):
        if mark in suffixes:
            return kind
    return None
