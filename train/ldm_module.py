"""Stage 2: a LightningModule training a text-conditioned UNet in a frozen VAE's latent space."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from PIL import Image

from train import diffusion
from train.text import FrozenTextEncoder
from train.util import atomic_dir, image_grid

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


class LatentDiffusion(L.LightningModule):
    """Frozen AutoencoderKL and text encoder, trainable UNet (Rombach et al. 2022)."""

    frozen_prefixes = ("vae.", "text_encoder.")

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        text_encoder: FrozenTextEncoder,
        noise_scheduler: DDPMScheduler,
        optimizer: OptimizerFactory,
        lr_scheduler: SchedulerFactory | None = None,
        caption_dropout: float = 0.1,
        snr_gamma: float | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        check_compatible(unet, vae, text_encoder)
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.noise_scheduler = noise_scheduler
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.caption_dropout, self.snr_gamma = caption_dropout, snr_gamma
        self.vae.requires_grad_(False)
        self.vae.eval()
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        # Frozen weights come back from their own source at load time, so checkpoints stay small.
        self.strict_loading = False
        empty = text_encoder.tokenize([""])
        self.register_buffer("_empty_ids", empty["input_ids"], persistent=False)
        self.register_buffer("_empty_mask", empty["attention_mask"], persistent=False)
        self._null_context: torch.Tensor | None = None  # see null_context()

    @property
    def tokenizer(self):
        return self.text_encoder.tokenizer

    @property
    def latent_scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def resolution(self) -> int:
        return int(self.unet.config.sample_size) * vae_scale_factor(self.vae)

    def train(self, mode: bool = True) -> LatentDiffusion:
        super().train(mode)
        self.vae.eval()  # frozen parts never switch to train mode
        self.text_encoder.train(False)
        return self

    @torch.no_grad()
    def encode_images(
        self, pixels: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Pixels [B, 3, H, W] in [-1, 1] -> scaled latents [B, C, H/f, W/f]."""
        posterior = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        return posterior.sample(generator=generator) * self.latent_scale

    def caption_drop_mask(self, n: int, device: torch.device) -> torch.Tensor | None:
        """Which of ``n`` captions become the empty prompt (Ho & Salimans 2022, CFG); None
        when none can (evaluation, or no dropout)."""
        if not self.training or self.caption_dropout <= 0:
            return None
        return torch.rand(n, device=device) < self.caption_dropout

    def drop_captions(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Replace a random subset of captions with the empty prompt's tokens."""
        drop = self.caption_drop_mask(ids.shape[0], ids.device)
        if drop is None:
            return ids, mask
        ids = torch.where(drop[:, None], self._empty_ids.expand_as(ids), ids)
        mask = torch.where(drop[:, None], self._empty_mask.expand_as(mask), mask)
        return ids, mask

    def batch_latents(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled latents [B, C, h, w]: from precomputed posterior moments when the batch has
        them (``ldm-data encode`` shards), else by encoding ``pixel_values``."""
        if "latent_moments" not in batch:
            return self.encode_images(batch["pixel_values"], generator)
        posterior = DiagonalGaussianDistribution(batch["latent_moments"].to(self.vae.dtype))
        return posterior.sample(generator=generator) * self.latent_scale

    def batch_context(self, batch: dict) -> torch.Tensor:
        """Text hidden states [B, L, D], with caption dropout, precomputed or encoded here."""
        if "encoder_hidden_states" not in batch:
            ids, mask = self.drop_captions(batch["input_ids"], batch["attention_mask"])
            return self.text_encoder(ids, mask)
        hidden = batch["encoder_hidden_states"].to(self.dtype)
        drop = self.caption_drop_mask(hidden.shape[0], hidden.device)
        if drop is None:
            return hidden
        return torch.where(drop[:, None, None], self.null_context().to(hidden.dtype), hidden)

    def null_context(self) -> torch.Tensor:
        """The empty prompt's hidden states [1, L, D], computed once."""
        if self._null_context is None:
            self._null_context = self.text_encoder(self._empty_ids, self._empty_mask)
        return self._null_context

    def diffusion_step(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        x0 = self.batch_latents(batch, generator)
        context = self.batch_context(batch)  # [B, L, D]
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        t = diffusion.sample_timesteps(self.noise_scheduler, x0.shape[0], x0.device, generator)
        x_t = diffusion.noisy_latents(self.noise_scheduler, x0, noise, t)
        target = diffusion.training_target(self.noise_scheduler, x0, noise, t)
        prediction = self.unet(x_t, t, encoder_hidden_states=context).sample
        weights = diffusion.min_snr_weights(self.noise_scheduler, t, self.snr_gamma)
        return diffusion.diffusion_loss(prediction, target, weights)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.diffusion_step(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["key"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # Fixed noise and timesteps per batch so validation loss is comparable across steps.
        generator = torch.Generator(device=self.device).manual_seed(batch_idx)
        loss = self.diffusion_step(batch, generator)
        self.log("val/loss", loss, prog_bar=True, batch_size=len(batch["key"]))
        return loss

    def configure_optimizers(self):
        params = [p for p in self.unet.parameters() if p.requires_grad]
        return optimizer_config(params, self.optimizer_factory, self.lr_scheduler_factory)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(self.frozen_prefixes)]:
            del state[key]

    def pipeline(self, scheduler=None) -> StableDiffusionPipeline:
        """The diffusers pipeline over this module's components (shared, not copied)."""
        pipe = StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder.model,
            tokenizer=self.text_encoder.tokenizer,
            unet=self.unet,
            scheduler=scheduler or DDIMScheduler.from_config(self.noise_scheduler.config),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def preview(
        self,
        batch: dict | None,
        prompts: list[str] | None = None,
        seed: int = 0,
        num_inference_steps: int = 25,
        guidance_scale: float = 4.0,
    ) -> Image.Image:
        """A grid of samples for `prompts` (or the batch's captions) from diffusers' pipeline."""
        prompts = prompts or list(batch["caption"])[:8]
        was_training = self.unet.training
        self.unet.eval()
        try:
            images = self.pipeline()(
                prompts,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=torch.Generator(device="cpu").manual_seed(seed),
                output_type="pil",
            ).images
        finally:
            self.unet.train(was_training)
        return image_grid(images)

    def export(self, out_dir: str | Path) -> Path:
        """Write a diffusers-layout folder (safetensors); replaces `out_dir` atomically."""
        scheduler = DDPMScheduler.from_config(self.noise_scheduler.config)
        with atomic_dir(out_dir) as tmp:
            self.pipeline(scheduler).save_pretrained(tmp, safe_serialization=True)
        return Path(out_dir)


def optimizer_config(
    params, optimizer: OptimizerFactory, lr_scheduler: SchedulerFactory | None
) -> torch.optim.Optimizer | dict:
    """What `configure_optimizers` returns: the optimizer, and its schedule stepped per step."""
    opt = optimizer(params=params)
    if lr_scheduler is None:
        return opt
    return {"optimizer": opt, "lr_scheduler": {"scheduler": lr_scheduler(opt), "interval": "step"}}


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
