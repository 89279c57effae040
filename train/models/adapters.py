"""Adapters (LoRA, DoRA, LoHa, LoKr) on a backbone's diffusers model, through peft.

diffusers' models take a peft config in `add_adapter` and keep the adapter in their own module
tree, so every strategy, EMA and gather sees one model; this module holds what the task and the
exports need besides: which parameters train, the adapter's own state, and a merged copy.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from train.errors import ConfigError

ADAPTER = "default"  # peft's adapter name: one adapter per run


def attach(model: nn.Module, config: Any, setting: str = "model.backbone.adapter") -> nn.Module:
    """Freeze ``model`` and add the adapter ``config`` describes (a peft ``PeftConfig``); only
    the adapter's parameters train, in float32 whatever the base's dtype (as diffusers'
    ``cast_training_params`` does: bf16 adapter updates lose the small steps). ``setting``: the
    config key of the adapter, for messages."""
    model.requires_grad_(False)
    try:
        _add_adapter(model, copy.deepcopy(config))
    except ValueError as e:
        if "not found in the base model" not in str(e):
            raise
        raise ConfigError(
            f"{setting}.target_modules={sorted(config.target_modules)} matches no "
            f"module of the {type(model).__name__}; its adaptable layers end in: "
            f"{', '.join(layer_suffixes(model))}"
        ) from None
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model


def _add_adapter(model: nn.Module, config: Any) -> None:
    """diffusers' ``add_adapter``; for other models (PixArt's transformer, which lacks diffusers'
    peft mixin, and transformers' text encoders, whose own ``add_adapter`` asks for a newer peft
    than the registries have) peft's injection, which diffusers' method wraps, with the same
    ``peft_config`` record."""
    from diffusers import ModelMixin

    if isinstance(model, ModelMixin) and hasattr(model, "add_adapter"):
        model.add_adapter(config, adapter_name=ADAPTER)
        return
    from peft import inject_adapter_in_model

    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    model.peft_config = {ADAPTER: config}


def layer_suffixes(model: nn.Module) -> list[str]:
    """The distinct last name parts of `model`'s Linear and Conv2d layers: what target_modules
    can name (peft matches a target against the end of each module's path)."""
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            parts = name.split(".")
            names.add(".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1])  # to_out.0
    return sorted(names)


def targets_in(model: nn.Module, config: Any) -> bool:
    """Whether the peft ``config``'s target_modules name any module of ``model``."""
    from peft.tuners.tuners_utils import check_target_module_exists

    return any(check_target_module_exists(config, name) for name, _ in model.named_modules())


def has_adapter(model: nn.Module) -> bool:
    return bool(getattr(model, "peft_config", None))


def adapter_config(model: nn.Module) -> Any:
    return model.peft_config[ADAPTER]


def is_lora(model: nn.Module) -> bool:
    from peft import LoraConfig

    return isinstance(adapter_config(model), LoraConfig)


def adapter_metadata(model: nn.Module) -> dict[str, Any]:
    """The adapter's peft config as a dict: what `load_lora_weights` needs to rebuild it with the
    trained rank and alpha (without it a LoRA with alpha != rank reloads at the wrong strength)."""
    meta = adapter_config(model).to_dict()
    # Sets (target_modules) are not JSON; diffusers writes this into the safetensors header.
    return {k: sorted(v) if isinstance(v, set) else v for k, v in meta.items()}


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights under peft's key names (``...to_q.lora_A.weight``)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=ADAPTER)


def trainable_keys(module: nn.Module) -> set[str]:
    """State-dict keys of ``module``'s trained parameters (the adapter's, when it has one)."""
    return {name for name, p in module.named_parameters() if p.requires_grad}


def adapter_leaves(model: nn.Module) -> list[nn.Module]:
    """The modules that hold an adapter's weights directly (LoRA's ``lora_A``/``lora_B``
    layers, DoRA's magnitudes): FSDP units of their own, so that no unit's flat parameter mixes
    trained and frozen weights (FSDP then keeps gradients for the frozen ones too, and on CPU
    processes its backward crashes)."""
    leaves = []
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if own and all(p.requires_grad for p in own):
            leaves.append(module)
    return leaves


def merged(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with the adapter folded into the base weights and removed: a plain
    diffusers model that any tool loads (``ldm-export --format merged``)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = copy.deepcopy(model)
    for module in out.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge(adapter_names=[ADAPTER])
    _unwrap_tuner_layers(out)
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in vars(out):  # set on the instance (the classes may define a default)
            delattr(out, attr)
    return out.requires_grad_(False)


def _unwrap_tuner_layers(model: nn.Module) -> None:
    """Replace every peft layer by its (now merged) base layer. diffusers' `unload_lora` does this
    for LoRA only; LoHa and LoKr layers have the same `base_layer` and merge the same way."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, BaseTunerLayer):
                setattr(module, name, child.get_base_layer())
