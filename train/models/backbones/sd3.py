"""SD3's MMDiT (Esser et al. 2024): `SD3Transformer2DModel` over unpacked latents, text tokens
and the pooled text embedding, sampled by `StableDiffusion3Pipeline` with rectified flow."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from train.errors import ConfigError
from train.models.backbones.base import Backbone
from train.models.conditioning import Conditioning


class SD3Backbone(Backbone):
    """A diffusers `SD3Transformer2DModel`; its timestep is sigma * 1000, as the pipeline's."""

    component = "transformer"
    pipeline_class = "StableDiffusion3Pipeline"
    sampled_by = ("flow",)
    setting = "model.backbone.model"
    needs_shift_factor = True  # the pipeline decodes latents / scaling_factor + shift_factor

    @staticmethod
    def predict(model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning):
        return model(hidden_states=x_t, timestep=t, encoder_hidden_states=cond.hidden,
                     pooled_projections=cond.pooled, return_dict=False)[0]  # fmt: skip

    def check(self, latent_channels: int, conditioner: Any, objective: Any) -> None:
        super().check(latent_channels, conditioner, objective)
        cfg, s = self.model.config, self.setting
        out = cfg.out_channels if cfg.out_channels is not None else cfg.in_channels
        if int(out) != int(cfg.in_channels):
            raise ConfigError(f"{s}.out_channels={out} but the velocity has the latents' "
                              f"{cfg.in_channels} channels; set {s}.out_channels="
                              f"{cfg.in_channels}")  # fmt: skip
        check_text_widths(s, cfg, conditioner, "model/conditioner=sd3_tiny")
        inner = int(cfg.num_attention_heads) * int(cfg.attention_head_dim)
        if int(cfg.caption_projection_dim) != inner:
            raise ConfigError(
                f"{s}.caption_projection_dim={cfg.caption_projection_dim} but the attention is "
                f"{inner} wide (num_attention_heads x attention_head_dim); set "
                f"{s}.caption_projection_dim={inner}"
            )
        self._check_patches(cfg)

    def _check_patches(self, cfg: Any) -> None:
        s, side, patch = self.setting, int(cfg.sample_size), int(cfg.patch_size)
        if side % patch:
            raise ConfigError(f"{s}.sample_size={side} is not a multiple of {s}.patch_size="
                              f"{patch}; the latent side must split into patches")  # fmt: skip
        if cfg.pos_embed_max_size is not None and side // patch > int(cfg.pos_embed_max_size):
            raise ConfigError(
                f"{s}.pos_embed_max_size={cfg.pos_embed_max_size} is below the {side // patch} "
                f"patches a side of {s}.sample_size={side} needs; set "
                f"{s}.pos_embed_max_size={side // patch} or more"
            )

    def pipeline_extras(self) -> dict[str, Any]:
        return {}  # image_encoder / feature_extractor (IP-Adapter) default to None

    def wrap_units(self) -> set[type[nn.Module]]:
        from diffusers.models.attention import JointTransformerBlock

        return {JointTransformerBlock}


def check_text_widths(setting: str, cfg: Any, conditioner: Any, use: str) -> None:
    """joint_attention_dim = the conditioner's token width; pooled_projection_dim = its pooled
    size (SD3 and Flux both)."""
    pooled = conditioner.pooled_size
    if pooled is None:
        raise ConfigError(f"{setting} needs a pooled text embedding (pooled_projections) but "
                          f"the conditioner gives none; use {use}")  # fmt: skip
    width = conditioner.hidden_size
    if int(cfg.joint_attention_dim) != width:
        raise ConfigError(
            f"{setting}.joint_attention_dim={cfg.joint_attention_dim} but the conditioner's "
            f"text tokens are {width} wide; set {setting}.joint_attention_dim={width}"
        )
    if int(cfg.pooled_projection_dim) != pooled:
        raise ConfigError(
            f"{setting}.pooled_projection_dim={cfg.pooled_projection_dim} but the conditioner's "
            f"pooled embedding is {pooled} wide; set {setting}.pooled_projection_dim={pooled}"
        )
