"""SD3 ControlNet (the InstantX design in diffusers): a trainable copy of the first blocks of a
frozen MMDiT that reads the control image's VAE latents and adds its block outputs to the base's.

The trained model is diffusers' `SD3ControlNetModel`, started as a copy of the base's patch,
time-text and context embedders and first `num_layers` blocks, with zero-initialised control
input and output projections (training starts from the base's own prediction). The base
transformer is frozen and held outside the module tree, as for the UNet ControlNet.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from train.errors import ConfigError
from train.models.backbones.controlnet import (
    FrozenBaseControlNet,
    batch_controls,
    require_plain_base,
)
from train.models.backbones.sd3 import SD3Backbone
from train.models.conditioning import Conditioning


def controlnet_from_transformer(transformer: nn.Module, num_layers: int) -> nn.Module:
    """`SD3ControlNetModel.from_transformer` without its two traps (diffusers 0.42): it writes
    num_layers into the base's own config (its FrozenDict guard never fires), which would export
    the frozen transformer with the ControlNet's depth; and with all blocks it fails on the
    base's last one (context_pre_only: other norms). Same initialisation otherwise."""
    from diffusers import SD3ControlNetModel
    from diffusers.models.controlnets.controlnet import zero_module

    config = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
    config.update(num_layers=num_layers, extra_conditioning_channels=0)
    controlnet = SD3ControlNetModel.from_config(config)
    for name in ("pos_embed", "time_text_embed", "context_embedder"):
        getattr(controlnet, name).load_state_dict(getattr(transformer, name).state_dict())
    blocks = {k: v for k, v in transformer.transformer_blocks.state_dict().items()
              if int(k.split(".", 1)[0]) < num_layers}  # fmt: skip
    controlnet.transformer_blocks.load_state_dict(blocks)
    controlnet.pos_embed_input = zero_module(controlnet.pos_embed_input)
    return controlnet


def controlled_depth(base: SD3Backbone, num_layers: int | None) -> int:
    """The ControlNet's depth: ``num_layers``, or all the base's blocks that take residuals (the
    last block, context_pre_only, takes none)."""
    most = int(base.model.config.num_layers) - 1
    if num_layers is None:
        return most
    if not 0 < int(num_layers) <= most:
        raise ConfigError(
            f"model.backbone.num_layers={num_layers}: the ControlNet copies the base's blocks "
            f"that take its residuals, the first {most} of {most + 1} (the last takes none); "
            f"choose 1 to {most}"
        )
    return int(num_layers)


class SD3ControlNetBackbone(FrozenBaseControlNet):
    """An `SD3ControlNetModel` over a frozen SD3 backbone."""

    base_component = "transformer"
    pipeline_class = "StableDiffusion3ControlNetPipeline"
    sampled_by = SD3Backbone.sampled_by
    needs_shift_factor = True

    def __init__(
        self,
        base: SD3Backbone,
        model: nn.Module | None = None,
        num_layers: int | None = None,
        conditioning_scale: float = 1.0,
        gradient_checkpointing: bool = False,
    ) -> None:
        """``model``: a ControlNet to go on training (``SD3ControlNetModel.from_pretrained``);
        by default one is made from ``base`` with its first ``num_layers`` blocks (null: all that
        take its residuals, every block but the last; InstantX's take 6 of SD3 Medium's 24)."""
        require_plain_base(base, "transformer")
        if model is None:
            model = controlnet_from_transformer(base.model, controlled_depth(base, num_layers))
        super().__init__(base, model, conditioning_scale, gradient_checkpointing)

    @property
    def transformer(self) -> nn.Module:
        return self.base.model

    def encode_control(self, control: torch.Tensor | None, vae: Any) -> torch.Tensor | None:
        """The control image's latents, as StableDiffusion3ControlNetPipeline computes them:
        (z - shift) * scaling_factor of the image in [-1, 1], shift 0 for ControlNets with
        force_zeros_for_pooled_projection (InstantX's). The posterior mean where the pipeline
        samples: the same control on every rank and after a resume."""
        if control is None:
            return None
        instantx = self.model.config.force_zeros_for_pooled_projection
        shift = 0.0 if instantx else vae.config.shift_factor
        with torch.no_grad():
            z = vae.encode((2 * control - 1).to(vae.dtype)).latent_dist.mean
        return (z - float(shift or 0.0)) * float(vae.config.scaling_factor)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        if cond.control is None:
            raise ConfigError("the ControlNet got no control image: set data.control (e.g. "
                              "data/control=mask, or data/control=member)")  # fmt: skip
        blocks = self.predict_blocks(self.model, x_t, t, cond, self.conditioning_scale)
        return self.transformer(hidden_states=x_t, timestep=t, encoder_hidden_states=cond.hidden,
                                pooled_projections=cond.pooled,
                                block_controlnet_hidden_states=blocks,
                                return_dict=False)[0]  # fmt: skip

    @staticmethod
    def predict_blocks(
        model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning, scale: float
    ) -> list[torch.Tensor]:
        """The ControlNet's block outputs [B, tokens, inner], called as the pipeline calls it:
        zero pooled text for force_zeros_for_pooled_projection, no text without a context
        embedder (SD 3.5's 8B ControlNets)."""
        cfg = model.config
        zero_pooled = cfg.force_zeros_for_pooled_projection
        pooled = torch.zeros_like(cond.pooled) if zero_pooled else cond.pooled
        hidden = cond.hidden if cfg.joint_attention_dim is not None else None
        return model(hidden_states=x_t, controlnet_cond=cond.control.to(x_t.dtype),
                     conditioning_scale=scale, encoder_hidden_states=hidden,
                     pooled_projections=pooled, timestep=t, return_dict=False)[0]  # fmt: skip

    @staticmethod
    def predict(model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning):
        """The ControlNet's block outputs alone (what FLOP counting measures)."""
        blocks = SD3ControlNetBackbone.predict_blocks(model, x_t, t, cond, 1.0)
        return torch.cat([b.flatten(1) for b in blocks], dim=1)

    def check(self, latent_channels: int, conditioner: Any, objective: Any) -> None:
        self.base.check(latent_channels, conditioner, objective)
        mine, base = self.model.config, self.transformer.config
        for key in ("in_channels", "patch_size", "num_attention_heads", "attention_head_dim"):
            if int(mine[key]) != int(base[key]):
                raise ConfigError(
                    f"model.backbone.model has {key}={mine[key]} but the base transformer "
                    f"{base[key]}; use a ControlNet made for this base (model.backbone.model=null "
                    "makes one from it)"
                )

    def sample_inputs(self, batch: dict | None, n: int) -> dict[str, Any]:
        return {"control_image": batch_controls(batch, n)}
