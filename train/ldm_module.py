"""Stage 2: a LightningModule training a text-conditioned UNet in a frozen VAE's latent space."""

from __future__ import annotations

import functools
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
from torch.distributed.fsdp import FullyShardedDataParallel

from train import diffusion
from train.flops import unet_train_flops
from train.noise import SampleRNG, row_offset
from train.parts import FrozenParts, check_compatible, vae_scale_factor
from train.text import FrozenTextEncoder
from train.util import atomic_dir, image_grid

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


class LatentDiffusion(L.LightningModule):
    """Frozen AutoencoderKL and text encoder, trainable UNet (Rombach et al. 2022)."""

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
        noise_seed: int = 0,
    ) -> None:
        super().__init__()
        check_compatible(unet, vae, text_encoder)
        self.unet = unet
        # The frozen parts are kept out of the module tree, so DDP, FSDP and DeepSpeed wrap,
        # shard and checkpoint only what trains, and every rank holds a whole VAE and text
        # encoder (ZeRO-3 would otherwise gather them on every forward). `_apply` moves them.
        self._frozen = FrozenParts(vae, text_encoder)
        self.noise_scheduler = noise_scheduler
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.caption_dropout, self.snr_gamma = caption_dropout, snr_gamma
        self.noise_seed = noise_seed
        vae.requires_grad_(False).eval()
        text_encoder.requires_grad_(False)
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        empty = text_encoder.tokenize([""])
        self.register_buffer("_empty_ids", empty["input_ids"], persistent=False)
        self.register_buffer("_empty_mask", empty["attention_mask"], persistent=False)
        self._null_context: torch.Tensor | None = None  # see null_context()
        self._flops = functools.cache(unet_train_flops)  # by micro-batch shape
        self.flops_per_batch: int | None = None

    @property
    def vae(self) -> AutoencoderKL:
        return self._frozen.vae

    @property
    def text_encoder(self) -> FrozenTextEncoder:
        return self._frozen.text_encoder

    def _apply(self, fn, recurse: bool = True):
        # .to()/.cuda()/.half() reach the unregistered frozen parts too.
        super()._apply(fn, recurse)
        if recurse:
            self.vae._apply(fn)
            self.text_encoder._apply(fn)
        return self

    def on_fit_start(self) -> None:
        # FSDP moves only the parameters it wraps; the frozen parts follow the root device.
        device = self.trainer.strategy.root_device
        self.vae.to(device)
        self.text_encoder.to(device)

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

    def caption_drop_mask(self, rng: SampleRNG) -> torch.Tensor | None:
        """Which captions become the empty prompt (Ho & Salimans 2022, CFG); None when none can
        (evaluation, or no dropout)."""
        if not self.training or self.caption_dropout <= 0:
            return None
        return rng.rand() < self.caption_dropout

    def batch_latents(self, batch: dict, rng: SampleRNG) -> torch.Tensor:
        """Scaled latents [B, C, h, w] sampled from the VAE posterior: precomputed moments when
        the batch has them (``ldm-data encode`` shards), else by encoding ``pixel_values``."""
        if "latent_moments" in batch:
            posterior = DiagonalGaussianDistribution(batch["latent_moments"].to(self.vae.dtype))
        else:
            with torch.no_grad():
                pixels = batch["pixel_values"].to(self.vae.dtype)
                posterior = self.vae.encode(pixels).latent_dist
        eps = rng.randn(tuple(posterior.mean.shape[1:]), posterior.mean.dtype)
        return (posterior.mean + posterior.std * eps) * self.latent_scale

    def batch_context(self, batch: dict, rng: SampleRNG) -> torch.Tensor:
        """Text hidden states [B, L, D], with caption dropout, precomputed or encoded here."""
        drop = self.caption_drop_mask(rng)
        if "encoder_hidden_states" not in batch:
            ids, mask = batch["input_ids"], batch["attention_mask"]
            if drop is not None:
                ids = torch.where(drop[:, None], self._empty_ids.expand_as(ids), ids)
                mask = torch.where(drop[:, None], self._empty_mask.expand_as(mask), mask)
            return self.text_encoder(ids, mask)
        hidden = batch["encoder_hidden_states"].to(self.dtype)
        if drop is None:
            return hidden
        return torch.where(drop[:, None, None], self.null_context().to(hidden.dtype), hidden)

    def null_context(self) -> torch.Tensor:
        """The empty prompt's hidden states [1, L, D], computed once."""
        if self._null_context is None:
            self._null_context = self.text_encoder(self._empty_ids, self._empty_mask)
        return self._null_context

    def diffusion_step(self, batch: dict, rng: SampleRNG) -> torch.Tensor:
        """The denoising loss of one micro-batch; every random draw comes from ``rng``."""
        x0 = self.batch_latents(batch, rng)
        context = self.batch_context(batch, rng)  # [B, L, D]
        noise = rng.randn(tuple(x0.shape[1:]), x0.dtype)
        t = rng.randint(self.noise_scheduler.config.num_train_timesteps)
        x_t = diffusion.noisy_latents(self.noise_scheduler, x0, noise, t)
        target = diffusion.training_target(self.noise_scheduler, x0, noise, t)
        prediction = self.unet(x_t, t, encoder_hidden_states=context).sample
        weights = diffusion.min_snr_weights(self.noise_scheduler, t, self.snr_gamma)
        return diffusion.diffusion_loss(prediction, target, weights)

    def training_rng(self, batch_size: int, batch_idx: int) -> SampleRNG:
        """Draws for this micro-batch keyed by (seed, step, row in the global batch)."""
        trainer = self.trainer
        first = row_offset(
            trainer.global_rank,
            trainer.world_size,
            batch_idx % trainer.accumulate_grad_batches,
            batch_size,
        )
        return SampleRNG.for_rows(
            self.noise_seed, trainer.global_step, first, batch_size, self.device
        )

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        # Lightning's ThroughputMonitor reads `flops_per_batch` for its MFU metric.
        if "latent_moments" in batch:
            c, h, w = batch["latent_moments"].shape[1:]
            latent = (c // 2, h, w)  # [B, 2C, h, w]: mean and log-variance
        else:
            f = vae_scale_factor(self.vae)
            h, w = batch["pixel_values"].shape[2:]
            latent = (self.unet.config.in_channels, h // f, w // f)
        context = (self.text_encoder.max_length, self.text_encoder.hidden_size)
        self.flops_per_batch = self._flops(self.unet, len(batch["key"]), latent, context)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        n = len(batch["key"])
        loss = self.diffusion_step(batch, self.training_rng(n, batch_idx))
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # Fixed draws per batch so validation loss is comparable across steps.
        n = len(batch["key"])
        rng = SampleRNG.for_rows(self.noise_seed, -1 - batch_idx, 0, n, self.device)
        loss = self.diffusion_step(batch, rng)
        self.log("val/loss", loss, prog_bar=True, batch_size=n, sync_dist=True)
        return loss

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        model = self.trainer.strategy.model
        if gradient_clip_val and isinstance(model, FullyShardedDataParallel):
            if gradient_clip_algorithm not in (None, "norm"):
                raise ValueError("under FSDP only trainer.gradient_clip_algorithm=norm works")
            # Lightning's FSDP plugin refuses norm clipping; FSDP's own sums over all shards.
            model.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        params = [p for p in self.unet.parameters() if p.requires_grad]
        return optimizer_config(params, self.optimizer_factory, self.lr_scheduler_factory)

    def unet_from_state(self, state: dict[str, torch.Tensor]) -> UNet2DConditionModel:
        """A plain UNet of this module's architecture holding ``state`` (e.g. gathered from
        shards, or EMA weights), on this module's device."""
        unet = UNet2DConditionModel.from_config(self.unet.config)
        unet.load_state_dict(state, strict=True)
        return unet.to(device=self.vae.device, dtype=self.vae.dtype).eval()

    def pipeline(
        self, scheduler=None, unet: UNet2DConditionModel | None = None
    ) -> StableDiffusionPipeline:
        """The diffusers pipeline over this module's components (shared, not copied); ``unet``
        replaces the trained one (gathered or EMA weights)."""
        pipe = StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder.model,
            tokenizer=self.text_encoder.tokenizer,
            unet=unet if unet is not None else self.unet,
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
        unet: UNet2DConditionModel | None = None,
    ) -> Image.Image:
        """A grid of samples for `prompts` (or the batch's captions) from diffusers' pipeline."""
        prompts = prompts or list(batch["caption"])[:8]
        was_training = self.unet.training
        self.unet.eval()
        try:
            images = self.pipeline(unet=unet)(
                prompts,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=torch.Generator(device="cpu").manual_seed(seed),
                output_type="pil",
            ).images
        finally:
            self.unet.train(was_training)
        return image_grid(images)

    def export(self, out_dir: str | Path, unet: UNet2DConditionModel | None = None) -> Path:
        """Write a diffusers-layout folder (safetensors); replaces `out_dir` atomically.
        ``unet``: the weights to write instead of the live ones (gathered shards, EMA)."""
        scheduler = DDPMScheduler.from_config(self.noise_scheduler.config)
        with atomic_dir(out_dir) as tmp:
            self.pipeline(scheduler, unet).save_pretrained(tmp, safe_serialization=True)
        return Path(out_dir)


def optimizer_config(
    params, optimizer: OptimizerFactory, lr_scheduler: SchedulerFactory | None
) -> torch.optim.Optimizer | dict:
    """What `configure_optimizers` returns: the optimizer, and its schedule stepped per step."""
    opt = optimizer(params)  # positional: DeepSpeedCPUAdam names it model_params
    if lr_scheduler is None:
        return opt
    return {"optimizer": opt, "lr_scheduler": {"scheduler": lr_scheduler(opt), "interval": "step"}}
