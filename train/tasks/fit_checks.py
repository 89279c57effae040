"""Checks, when a LatentDiffusion is built, that its parts can train together: each a
ConfigError naming the setting to change, raised before any training step."""

from __future__ import annotations

from diffusers import AutoencoderKL

from train.errors import ConfigError
from train.models.backbones.base import Backbone


def check_shift_factor(backbone: Backbone, vae: AutoencoderKL) -> None:
    """ConfigError when the backbone's pipeline decodes with a shift_factor the VAE lacks
    (decoding would fail at the first preview, after training started)."""
    if backbone.needs_shift_factor and vae.config.get("shift_factor") is None:
        raise ConfigError(
            f"{backbone.pipeline_class} decodes latents / scaling_factor + shift_factor but the "
            "VAE's shift_factor is null; set model.vae.shift_factor (0.0 for a VAE trained "
            "here; SD3's and Flux's VAEs ship theirs)"
        )


def check_text_adapter(backbone: Backbone) -> None:
    """ConfigError for a text-encoder adapter without the backbone's: the LoRA files, the
    adapter-only checkpoints and the kohya layout are for an adapter run (as in kohya's and
    diffusers' scripts, the text encoder's LoRA trains beside the UNet's)."""
    if backbone.adapter is None:
        raise ConfigError(
            "model.conditioner.adapter trains a LoRA on the text encoder beside the denoiser's, "
            "but model.backbone.adapter is null; fine-tune with experiment=lora (which sets it)"
        )
