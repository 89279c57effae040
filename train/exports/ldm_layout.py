"""diffusers state dicts -> the original LDM / SGM key layout of single-file checkpoints.

The inverse of diffusers' ``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint`` and
``convert_open_clip_checkpoint`` (diffusers/loaders/single_file_utils.py), which the tests run on
our output to get the diffusers weights back. Written by hand because diffusers ships only the
forward direction in its package; its scripts for this direction
(scripts/convert_diffusers_to_original_*.py) are not installed and hard-code SD's 4 blocks x 2
resnets. Every mapping here is derived from the model's config, so any block count converts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
UNET_FIXED = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
    "add_embedding.linear_1.": "label_emb.0.0.",
    "add_embedding.linear_2.": "label_emb.0.2.",
    "class_embedding.linear_1.": "label_emb.0.0.",
    "class_embedding.linear_2.": "label_emb.0.2.",
}
VAE_FIXED = {
    "conv_norm_out.": "norm_out.",
    "mid_block.resnets.0.": "mid.block_1.",
    "mid_block.resnets.1.": "mid.block_2.",
    "mid_block.attentions.0.": "mid.attn_1.",
}
VAE_ATTENTION = {
    "group_norm.": "norm.",
    "to_q.": "q.",
    "to_k.": "k.",
    "to_v.": "v.",
    "to_out.0.": "proj_out.",
}
OPENCLIP_FIXED = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.": "ln_final.",
}
OPENCLIP_LAYER = {
    "self_attn.out_proj.": "attn.out_proj.",
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
}


def _rename(key: str, prefixes: Mapping[str, str]) -> str | None:
    """`key` with its longest matching prefix in `prefixes` replaced, or None."""
    best = max((p for p in prefixes if key.startswith(p)), key=len, default=None)
    return None if best is None else prefixes[best] + key[len(best) :]


def _unet_prefixes(config: Mapping[str, Any]) -> tuple[dict[str, str], set[str]]:
    """diffusers module prefix -> LDM prefix for every block of a UNet2DConditionModel, and
    the LDM prefixes that are resnets (their inner names change too)."""
    per = int(config["layers_per_block"])
    names: dict[str, str] = dict(UNET_FIXED)
    resnets: set[str] = set()
    for b in range(len(config["down_block_types"])):
        for j in range(per):
            i = 1 + b * (per + 1) + j
            names[f"down_blocks.{b}.resnets.{j}."] = f"input_blocks.{i}.0."
            names[f"down_blocks.{b}.attentions.{j}."] = f"input_blocks.{i}.1."
            resnets.add(f"input_blocks.{i}.0.")
        last = 1 + b * (per + 1) + per
        names[f"down_blocks.{b}.downsamplers.0.conv."] = f"input_blocks.{last}.0.op."
    for diffusers, ldm in (("resnets.0.", "0."), ("attentions.0.", "1."), ("resnets.1.", "2.")):
        names[f"mid_block.{diffusers}"] = f"middle_block.{ldm}"
    resnets |= {"middle_block.0.", "middle_block.2."}
    for b, kind in enumerate(config["up_block_types"]):
        for j in range(per + 1):
            i = b * (per + 1) + j
            names[f"up_blocks.{b}.resnets.{j}."] = f"output_blocks.{i}.0."
            names[f"up_blocks.{b}.attentions.{j}."] = f"output_blocks.{i}.1."
            resnets.add(f"output_blocks.{i}.0.")
        slot = 2 if kind.startswith("CrossAttn") else 1  # after the attention, if there is one
        last = b * (per + 1) + per
        names[f"up_blocks.{b}.upsamplers.0.conv."] = f"output_blocks.{last}.{slot}.conv."
    return names, resnets


def unet_to_ldm(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict:
    """A UNet2DConditionModel's weights under LDM names (without the ``model.diffusion_model.``
    prefix). ValueError naming the first weight that has no place there."""
    if not isinstance(config["layers_per_block"], int):
        raise ValueError("layers_per_block differs per block: the LDM layout has one count")
    names, resnets = _unet_prefixes(config)
    out = {}
    for key, value in state.items():
        new = _rename(key, names)
        if new is None:
            raise ValueError(f"UNet weight {key} has no place in the LDM layout")
        block = next((r for r in resnets if new.startswith(r)), None)
        if block is not None:
            inner = new[len(block) :]
            head, _, rest = inner.partition(".")
            new = block + f"{UNET_RESNET.get(head, head)}.{rest}"
        out[new] = value
    return out


def _vae_prefixes(config: Mapping[str, Any]) -> dict[str, str]:
    names = {
        f"{part}.{k}": f"{part}.{v}"
        for part in ("encoder", "decoder")
        for k, v in VAE_FIXED.items()
    }
    blocks = len(config["down_block_types"])
    for i in range(blocks):
        names[f"encoder.down_blocks.{i}.resnets."] = f"encoder.down.{i}.block."
        down = f"encoder.down_blocks.{i}.downsamplers.0.conv."
        names[down] = f"encoder.down.{i}.downsample.conv."
    for i in range(len(config["up_block_types"])):
        level = len(config["up_block_types"]) - 1 - i  # LDM numbers the decoder bottom-up
        names[f"decoder.up_blocks.{i}.resnets."] = f"decoder.up.{level}.block."
        names[f"decoder.up_blocks.{i}.upsamplers.0.conv."] = f"decoder.up.{level}.upsample.conv."
    return names


def vae_to_ldm(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict:
    """An AutoencoderKL's weights under LDM names (without ``first_stage_model.``); the mid
    attention's linear weights as the 1x1 convolutions LDM's AttnBlock has."""
    names = _vae_prefixes(config)
    out = {}
    for key, value in state.items():
        new = _rename(key, names)
        if new is None:
            new = key  # conv_in, conv_out, quant_conv, post_quant_conv: the same names
        new = new.replace(".conv_shortcut.", ".nin_shortcut.")
        if ".mid.attn_1." in new:
            head, _, tail = new.partition(".mid.attn_1.")
            tail = _rename(tail, VAE_ATTENTION) or tail
            new = f"{head}.mid.attn_1.{tail}"
            if value.dim() == 2:
                value = value[:, :, None, None]
        out[new] = value
    return out


def openclip_to_ldm(state: Mapping[str, torch.Tensor]) -> dict:
    """A transformers CLIPTextModel(WithProjection)'s weights in OpenCLIP's layout (without the
    ``cond_stage_model.model.`` / ``conditioner.embedders.1.model.`` prefix): q, k and v stacked
    into ``in_proj``, the projection transposed."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    layer = "text_model.encoder.layers."
    for key, value in state.items():
        if key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        elif key.startswith(layer):
            index, _, inner = key[len(layer) :].partition(".")
            base = f"transformer.resblocks.{index}."
            parts = inner.split(".")
            if parts[0] == "self_attn" and parts[1] in ("q_proj", "k_proj", "v_proj"):
                _, proj, kind = parts
                qkv.setdefault(f"{base}attn.in_proj_{kind}", {})[proj] = value
            else:
                out[base + (_rename(inner, OPENCLIP_LAYER) or inner)] = value
        else:
            new = _rename(key, OPENCLIP_FIXED)
            if new is None:
                raise ValueError(f"text encoder weight {key} has no place in OpenCLIP's layout")
            out[new] = value
    for key, parts in qkv.items():
        out[key] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]], dim=0)
    return out
