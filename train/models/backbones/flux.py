"""Flux's transformer (`FluxTransformer2DModel`, Black Forest Labs 2024): latents packed into 2x2
patches as tokens, rotary position ids for image and text tokens, timestep (and, guidance-
distilled like FLUX.1-dev, a guidance value) on the 0..1 scale; sampled by `FluxPipeline`."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FluxPipeline
from torch import nn

from train.errors import ConfigError
from train.models.backbones.base import Backbone
from train.models.backbones.sd3 import check_text_widths
from train.models.conditioning import Conditioning

GUIDANCE = 3.5  # the value diffusers' Flux training scripts embed (their --guidance_scale)


class FluxBackbone(Backbone):
    """A diffusers `FluxTransformer2DModel`. Its config has no image size, so `sample_size`
    (the latent side previews and resolution checks use) is given here; `guidance` is the
    embedded guidance value trained with when the config has `guidance_embeds`."""

    component = "transformer"
    pipeline_class = "FluxPipeline"
    sampled_by = ("flow",)
    setting = "model.backbone.model"
    needs_shift_factor = True  # the pipeline decodes latents / scaling_factor + shift_factor
    sample_size_setting = "model.backbone.sample_size"

    def __init__(
        self,
        model: nn.Module,
        sample_size: int,
        guidance: float = GUIDANCE,
        gradient_checkpointing: bool = False,
        adapter: Any = None,
    ) -> None:
        super().__init__(model, gradient_checkpointing, adapter)
        self._sample_size, self.guidance = int(sample_size), float(guidance)

    @property
    def sample_size(self) -> int:
        return self._sample_size

    @property
    def latent_channels(self) -> int:
        return int(self.model.config.in_channels) // 4  # 2x2 patches of latents per token

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self.predict(self.model, x_t, t, cond, self.guidance)

    @staticmethod
    def predict(
        model: nn.Module,
        x_t: torch.Tensor,
        t: torch.Tensor,
        cond: Conditioning,
        guidance: float = GUIDANCE,
    ) -> torch.Tensor:
        """The velocity [B, C, h, w]: pack, call as FluxPipeline does, unpack."""
        b, c, h, w = x_t.shape
        # The pipeline's own (static, underscored) packing helpers, as diffusers' Flux training
        # scripts call them: the layout must be the one FluxPipeline samples with.
        tokens = FluxPipeline._pack_latents(x_t, b, c, h, w)  # [B, h/2 * w/2, 4C]
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x_t.device, x_t.dtype)
        txt_ids = torch.zeros(cond.hidden.shape[1], 3, device=x_t.device, dtype=x_t.dtype)
        g = None
        if model.config.guidance_embeds:  # else the model takes no guidance argument at all
            g = torch.full((b,), guidance, device=x_t.device, dtype=torch.float32)
        out = model(hidden_states=tokens, timestep=t / 1000, guidance=g,
                    pooled_projections=cond.pooled, encoder_hidden_states=cond.hidden,
                    txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]  # fmt: skip
        # vae_scale_factor=1: h and w are already the latent side.
        return FluxPipeline._unpack_latents(out, h, w, 1)

    def check(self, latent_channels: int, conditioner: Any, objective: Any) -> None:
        cfg, s = self.model.config, self.setting
        if int(cfg.in_channels) != 4 * latent_channels:
            raise ConfigError(
                f"{s}.in_channels={cfg.in_channels} but FluxPipeline packs 2x2 patches of the "
                f"VAE's {latent_channels} latent channels into each token: set {s}.in_channels="
                f"{4 * latent_channels} (4 x the VAE's latent_channels), or use a VAE with "
                f"in_channels/4 latent channels"
            )
        super().check(latent_channels, conditioner, objective)
        if cfg.out_channels not in (None, cfg.in_channels):
            raise ConfigError(
                f"{s}.out_channels={cfg.out_channels} but FluxPipeline unpacks "
                f"{cfg.in_channels} per token; set {s}.out_channels=null"
            )
        if int(cfg.patch_size) != 1:
            raise ConfigError(f"{s}.patch_size={cfg.patch_size}: FluxPipeline packs the 2x2 "
                              f"patches itself; set {s}.patch_size=1")  # fmt: skip
        check_text_widths(s, cfg, conditioner, "model/conditioner=flux_tiny")
        rope = [int(a) for a in cfg.axes_dims_rope]
        if sum(rope) != int(cfg.attention_head_dim) or any(a % 2 for a in rope):
            raise ConfigError(
                f"{s}.axes_dims_rope={rope} must be even and sum to {s}.attention_head_dim="
                f"{cfg.attention_head_dim} (rotary angles per axis of the position ids)"
            )
        if self.sample_size < 2 or self.sample_size % 2:
            raise ConfigError(
                f"{self.sample_size_setting}={self.sample_size}: the latent side must be even "
                "(2x2 patches); set it to data.resolution / the VAE's downsampling"
            )

    def pipeline_extras(self) -> dict[str, Any]:
        return {}  # image_encoder / feature_extractor (IP-Adapter) default to None

    def wrap_units(self) -> set[type[nn.Module]]:
        from diffusers.models.transformers.transformer_flux import (
            FluxSingleTransformerBlock,
            FluxTransformerBlock,
        )

        return {FluxTransformerBlock, FluxSingleTransformerBlock}
