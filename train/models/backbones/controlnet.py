"""ControlNet (Zhang et al. 2023): a trainable copy of a frozen UNet's encoder that reads a control
image and adds its residuals to the UNet's skip connections.

The trained model is diffusers' `ControlNetModel` (made with `from_unet`, so it starts as a copy
of the base's encoder with zero-initialised output convolutions: training starts from the base's
own prediction). The base UNet is frozen and held outside the module tree, as the VAE is: the
strategies wrap, shard and checkpoint only the ControlNet, and a checkpoint holds only it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from train.errors import ConfigError
from train.models.backbones.base import Backbone
from train.models.backbones.unet import UNetBackbone, added_cond_kwargs
from train.models.conditioning import Conditioning


class FrozenBase:
    """A plain holder (not an nn.Module): the base denoiser stays out of `state_dict` and
    wrapping."""

    def __init__(self, backbone: Backbone) -> None:
        self.backbone = backbone


def batch_controls(batch: dict | None, n: int) -> torch.Tensor:
    """The batch's first `n` control images [n, 3, H, W] in [0, 1] (repeated when it has fewer):
    what a ControlNet's previews are sampled with."""
    if batch is None or "control_values" not in batch:
        raise ConfigError("sampling a ControlNet needs a control image per prompt; previews "
                          "take them from the first training batch")  # fmt: skip
    control = batch["control_values"]
    rows = torch.arange(n) % len(control)
    return control[rows].float().clamp(0, 1).cpu()


def require_plain_base(base: Backbone, what: str) -> None:
    """ConfigError when the base carries an adapter: a ControlNet trains beside a plain model."""
    if base.adapter is not None:
        raise ConfigError(f"model.backbone.base has an adapter: a ControlNet trains beside a "
                          f"plain frozen {what}; remove model.backbone.base.adapter")  # fmt: skip


class FrozenBaseControlNet(Backbone):
    """What every ControlNet beside a frozen base backbone shares, whatever the family: the base
    held outside the module tree (moved with the module, exported as a frozen part under
    `base_component`), its sample size and FSDP units, the conditioning scale, the step's FLOPs.
    Subclasses make the ControlNet and call it with the base."""

    component = "controlnet"
    base_component = "unet"  # the frozen base's pipeline name
    setting = "model.backbone.base.model"
    sample_size_setting = "model.backbone.base.model.sample_size"

    def __init__(
        self,
        base: Backbone,
        model: nn.Module,
        conditioning_scale: float = 1.0,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__(model, gradient_checkpointing)
        base.model.requires_grad_(False).eval()
        self._base = FrozenBase(base)
        self.conditioning_scale = float(conditioning_scale)

    @property
    def base(self) -> Backbone:
        return self._base.backbone

    @property
    def sample_size(self) -> int:
        return self.base.sample_size

    def _apply(self, fn, recurse: bool = True):
        # .to()/.half() reach the frozen base too (it is not a registered submodule).
        super()._apply(fn, recurse)
        if recurse:
            self.base.model._apply(fn)
        return self

    def train_flops(self, batch: int, latent: tuple[int, ...], cond: Conditioning) -> int:
        """The ControlNet's forward + backward, plus the frozen base's forward and the backward
        through its activations (to the residuals; no weight gradients: about one more forward)."""
        from train.models.flops import train_flops

        base_fwd_bwd = self.base.train_flops(batch, latent, cond)
        return train_flops(self, batch, latent, cond) + base_fwd_bwd * 2 // 3

    def frozen_parts(self) -> dict[str, nn.Module]:
        return {self.base_component: self.base.model}

    def pipeline_call_kwargs(self) -> dict[str, Any]:
        return {"controlnet_conditioning_scale": self.conditioning_scale}

    def wrap_units(self) -> set[type[nn.Module]]:
        return self.base.wrap_units()


class ControlNetBackbone(FrozenBaseControlNet):
    """A `ControlNetModel` over a frozen UNet backbone (SD 1.x/2.x or SDXL)."""

    def __init__(
        self,
        base: UNetBackbone,
        model: nn.Module | None = None,
        conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256),
        conditioning_scale: float = 1.0,
        gradient_checkpointing: bool = False,
    ) -> None:
        """``model``: a ControlNet to go on training (e.g. ``ControlNetModel.from_pretrained``);
        by default one is made from ``base`` whose conditioning embedder has
        ``conditioning_embedding_out_channels`` (it downsamples the control image by 2 per
        entry after the first: the VAE's factor)."""
        from diffusers import ControlNetModel

        require_plain_base(base, "UNet")
        if model is None:
            channels = tuple(int(c) for c in conditioning_embedding_out_channels)
            model = ControlNetModel.from_unet(
                base.model, conditioning_embedding_out_channels=channels
            )
        super().__init__(base, model, conditioning_scale, gradient_checkpointing)
        family = "StableDiffusionXL" if base.is_sdxl else "StableDiffusion"
        self.pipeline_class = f"{family}ControlNetPipeline"

    @property
    def unet(self) -> nn.Module:
        return self.base.model

    @property
    def control_factor(self) -> int:
        """How much the conditioning embedder downsamples the control image."""
        return 2 ** (len(self.model.config.conditioning_embedding_out_channels) - 1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return controlled_prediction(self.model, self.unet, x_t, t, cond, self.conditioning_scale)

    @staticmethod
    def predict(model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning):
        """The ControlNet's residuals alone (what FLOP counting measures: the frozen UNet's
        forward is counted separately in `train_flops`)."""
        down, mid = model(
            x_t,
            t,
            encoder_hidden_states=cond.hidden,
            controlnet_cond=cond.control,
            added_cond_kwargs=added_cond_kwargs(model, cond),
            return_dict=False,
        )
        return torch.cat([r.flatten(1) for r in (*down, mid)], dim=1)

    def check(self, latent_channels: int, conditioner: Any, objective: Any) -> None:
        self.base.check(latent_channels, conditioner, objective)
        if int(self.model.config.in_channels) != int(self.unet.config.in_channels):
            raise ConfigError(
                f"model.backbone.model has in_channels={self.model.config.in_channels} but the "
                f"base UNet {self.unet.config.in_channels}; use a ControlNet made for this base "
                "(model.backbone.model=null makes one from it)"
            )

    def check_scale_factor(self, factor: int) -> None:
        if self.control_factor != factor:
            n = len(self.model.config.conditioning_embedding_out_channels)
            want = factor.bit_length()
            raise ConfigError(
                f"model.backbone.conditioning_embedding_out_channels has {n} entries, so the "
                f"control image is downsampled {self.control_factor}x, but the VAE downsamples "
                f"{factor}x; give it {want} entries (e.g. {[16 * 2**i for i in range(want)]})"
            )

    def pipeline_extras(self) -> dict[str, Any]:
        return self.base.pipeline_extras()

    def sample_inputs(self, batch: dict | None, n: int) -> dict[str, Any]:
        """The batch's first `n` control images (repeated when it has fewer)."""
        return {"image": batch_controls(batch, n)}


def controlled_prediction(
    controlnet: nn.Module,
    unet: nn.Module,
    x_t: torch.Tensor,
    t: torch.Tensor,
    cond: Conditioning,
    scale: float = 1.0,
) -> torch.Tensor:
    """The UNet's prediction with the ControlNet's residuals added to its skip connections, as
    diffusers' ControlNet pipelines compute it. ``cond.control``: [B, 3, H, W] in [0, 1]."""
    if cond.control is None:
        raise ConfigError(
            "the ControlNet got no control image: set data.control (e.g. data/control=mask, or "
            "data/control=member for KEY.control.png)"
        )
    control = cond.control.to(x_t.dtype)
    added = added_cond_kwargs(unet, cond)
    down, mid = controlnet(x_t, t, encoder_hidden_states=cond.hidden, controlnet_cond=control,
                           conditioning_scale=scale, added_cond_kwargs=added,
                           return_dict=False)  # fmt: skip
    return unet(
        x_t,
        t,
        encoder_hidden_states=cond.hidden,
        added_cond_kwargs=added,
        down_block_additional_residuals=[r.to(x_t.dtype) for r in down],
        mid_block_additional_residual=mid.to(x_t.dtype),
    ).sample
