"""Inpainting UNets (SD-inpainting layout): 9 input channels, in diffusers' order: the noisy
latents (4), the mask (1) and the masked image's latents (4).

A 4-channel base (a text-to-image UNet) is widened here: its input convolution gets 5 more
input channels with zero weights, so the widened UNet starts out predicting exactly what the
base predicts and learns to read the mask and the kept pixels (what SD-inpainting did from SD
1.2; `from_pretrained(in_channels=9, ignore_mismatched_sizes=True)` would re-initialise the
whole input convolution instead, diffusers#1619).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from train.errors import ConfigError
from train.models.backbones.unet import UNetBackbone
from train.models.conditioning import Conditioning
from train.objectives.base import Noised
from train.objectives.masks import RandomMasks, masked_mse


def widen_conv_in(model: nn.Module, channels: int) -> nn.Module:
    """Give `model`'s input convolution `channels` inputs; the new ones start at zero."""
    old = model.conv_in
    new = nn.Conv2d(channels, old.out_channels, old.kernel_size, old.stride, old.padding)
    new = new.to(device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : old.in_channels] = old.weight
        new.bias.copy_(old.bias)
    model.conv_in = new
    model.register_to_config(in_channels=channels)
    return model


class InpaintUNetBackbone(UNetBackbone):
    """A UNet2DConditionModel with mask and masked-image inputs (SD or SDXL inpainting)."""

    inpainting = True

    def __init__(
        self,
        model: nn.Module,
        gradient_checkpointing: bool = False,
        adapter: Any = None,
        masks: RandomMasks | None = None,
        masked_loss: bool = False,
    ) -> None:
        """``masks``: the random masks of samples whose data brings none (``data.mask``);
        ``masked_loss``: the loss over the masked latents only, normalised by the mask's area
        (else over the whole image, as SD-inpainting trained)."""
        cfg = model.config
        if int(cfg.in_channels) == int(cfg.out_channels):
            widen_conv_in(model, 2 * int(cfg.out_channels) + 1)
        super().__init__(model, gradient_checkpointing, adapter)
        self.masks = masks or RandomMasks()
        self.masked_loss = masked_loss
        family = "StableDiffusionXL" if self.is_sdxl else "StableDiffusion"
        self.pipeline_class = f"{family}InpaintPipeline"

    @property
    def latent_channels(self) -> int:
        return int(self.model.config.out_channels)

    @staticmethod
    def predict(model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning):
        if cond.inpaint is None:
            raise ValueError("an inpainting UNet needs the mask and masked-image latents")
        x = torch.cat([x_t, cond.inpaint.to(x_t.dtype)], dim=1)  # [B, 4 + 1 + 4, h, w]
        return UNetBackbone.predict(model, x, t, cond)

    def check(self, latent_channels: int, conditioner: Any, objective: Any) -> None:
        super().check(latent_channels, conditioner, objective)
        want = 2 * latent_channels + 1
        if int(self.model.config.in_channels) != want:
            raise ConfigError(
                f"{self.setting}.in_channels={self.model.config.in_channels}: an inpainting UNet "
                f"over a {latent_channels}-channel VAE has {want} (latents, mask, masked-image "
                f"latents) or {latent_channels} (a base to widen)"
            )

    def loss(self, prediction: torch.Tensor, noised: Noised, cond: Conditioning) -> torch.Tensor:
        if not self.masked_loss:
            return super().loss(prediction, noised, cond)
        mask = cond.inpaint[:, :1]  # the mask at the latents' size
        return masked_mse(prediction, noised.target, mask, noised.weights)

    def sample_inputs(self, batch: dict | None, n: int) -> dict[str, Any]:
        """The batch's first `n` images (cycled) with a centred box mask (half the side)."""
        if batch is None or "pixel_values" not in batch:
            raise ConfigError("sampling an inpainting model needs images; previews take them "
                              "from the first training batch")  # fmt: skip
        pixels = batch["pixel_values"]
        rows = torch.arange(n) % len(pixels)
        image = ((pixels[rows].float() + 1) / 2).clamp(0, 1).cpu()
        h, w = image.shape[-2:]
        mask = torch.zeros(n, 1, h, w)
        mask[..., h // 4 : h - h // 4, w // 4 : w - w // 4] = 1
        return {"image": image, "mask_image": mask}
