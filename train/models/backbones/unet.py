"""UNet backbones: SD 1.x/2.x (`UNet2DConditionModel` with cross-attention) and SDXL (the same
class with `addition_embed_type: text_time`: pooled text and size micro-conditioning)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from train.errors import ConfigError
from train.models.backbones.base import Backbone
from train.models.backbones.samplers import check_flow_sampler
from train.models.conditioning import Conditioning


def added_cond_kwargs(model: nn.Module, cond: Conditioning) -> dict[str, torch.Tensor] | None:
    """SDXL's pooled text and size embeddings for a model (UNet or ControlNet) whose config adds
    them (`addition_embed_type: text_time`); None for SD 1.x/2.x."""
    if model.config.addition_embed_type == "text_time":
        return {"text_embeds": cond.pooled, "time_ids": cond.sizes}
    return None


class UNetBackbone(Backbone):
    """A diffusers `UNet2DConditionModel`; SDXL-style when its config adds text-time embeds."""

    component = "unet"
    setting = "model.backbone.model"
    sampled_by = ("ddpm", "flow")

    def __init__(
        self, model: nn.Module, gradient_checkpointing: bool = False, adapter: Any = None
    ) -> None:
        super().__init__(model, gradient_checkpointing, adapter)
        self.pipeline_class = (
            "StableDiffusionXLPipeline" if self.is_sdxl else "StableDiffusionPipeline"
        )

    @property
    def is_sdxl(self) -> bool:
        return self.model.config.addition_embed_type == "text_time"

    @staticmethod
    def predict(model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning):
        added = added_cond_kwargs(model, cond)
        return model(x_t, t, encoder_hidden_states=cond.hidden, added_cond_kwargs=added).sample

    def check(self, latent_channels: int, conditioner: Any, objective: Any) -> None:
        super().check(latent_channels, conditioner, objective)
        if objective.kind == "flow":
            check_flow_sampler(objective, self.pipeline_class)
        width = int(self.model.config.cross_attention_dim)
        if width != conditioner.hidden_size:
            raise ConfigError(
                f"{self.setting}.cross_attention_dim={width} but the conditioner's hidden size "
                f"is {conditioner.hidden_size}; set {self.setting}.cross_attention_dim="
                f"{conditioner.hidden_size}"
            )
        if self.is_sdxl:
            self._check_sdxl(conditioner)

    def _check_sdxl(self, conditioner: Any) -> None:
        pooled = conditioner.pooled_size
        if pooled is None:
            raise ConfigError(
                f"{self.setting}.addition_embed_type=text_time (SDXL) needs a pooled text "
                "embedding, but the conditioner gives none; use model/conditioner=sdxl_tiny "
                "(or another with a CLIPTextModelWithProjection)"
            )
        cfg = self.model.config
        want = pooled + 6 * int(cfg.addition_time_embed_dim)
        if int(cfg.projection_class_embeddings_input_dim) != want:
            raise ConfigError(
                f"{self.setting}.projection_class_embeddings_input_dim="
                f"{cfg.projection_class_embeddings_input_dim} but the pooled embedding ({pooled})"
                f" + 6 sizes x addition_time_embed_dim ({cfg.addition_time_embed_dim}) is "
                f"{want}; set it to {want}"
            )

    def pipeline_extras(self) -> dict[str, Any]:
        if self.is_sdxl:
            # Caption dropout trains the unconditional branch on the empty prompt's encoding
            # (train/models/conditioners/sdxl.py); the pipeline's default would guide with zeros.
            return {"force_zeros_for_empty_prompt": False}
        return {"safety_checker": None, "feature_extractor": None,
                "requires_safety_checker": False}  # fmt: skip

    def wrap_units(self) -> set[type[nn.Module]]:
        from diffusers.models.resnet import ResnetBlock2D
        from diffusers.models.transformers.transformer_2d import Transformer2DModel

        return {ResnetBlock2D, Transformer2DModel}
