"""The frozen parts of latent diffusion and how they must fit the UNet."""

from __future__ import annotations

from diffusers import AutoencoderKL, UNet2DConditionModel

from train.text import FrozenTextEncoder


class FrozenParts:
    """A plain holder (not an nn.Module) for the frozen VAE and text encoder."""

    def __init__(self, vae: AutoencoderKL, text_encoder: FrozenTextEncoder) -> None:
        self.vae, self.text_encoder = vae, text_encoder


def vae_scale_factor(vae: AutoencoderKL) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def check_compatible(
    unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: FrozenTextEncoder
) -> None:
    """Fail with the setting to change when the parts cannot work together."""
    if unet.config.in_channels != vae.config.latent_channels:
        raise ValueError(
            f"model.unet.in_channels={unet.config.in_channels} but the VAE has "
            f"latent_channels={vae.config.latent_channels}; set model.unet.in_channels and "
            "model.unet.out_channels to the VAE's latent_channels"
        )
    if unet.config.cross_attention_dim != text_encoder.hidden_size:
        raise ValueError(
            f"model.unet.cross_attention_dim={unet.config.cross_attention_dim} but the text "
            f"encoder's hidden size is {text_encoder.hidden_size}; set "
            f"model.unet.cross_attention_dim={text_encoder.hidden_size}"
        )
