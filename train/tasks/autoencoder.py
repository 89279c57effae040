"""Stage 1: a LightningModule training diffusers' AutoencoderKL (reconstruction + KL)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from PIL import Image

from train.objectives.vae import kl_divergence
from train.tasks.optim import OptimizerFactory, SchedulerFactory, optimizer_config
from train.util import atomic_dir, image_grid


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 + L2 pixel loss for the first-stage autoencoder (after Rombach et al. 2022).

    The paper pairs L1 with LPIPS and a patch GAN, whose pretrained weights cannot ship here;
    adding L2 pulls large colour errors in faster, which matters most for short CPU runs.
    """
    recon, target = recon.float(), target.float()
    return F.l1_loss(recon, target) + F.mse_loss(recon, target)


def check_crop(size: int | None) -> None:
    if size is not None and size < 1:
        raise ValueError(f"model.train_crop={size}: must be a positive number of pixels or null")


def random_crop(pixels: torch.Tensor, size: int | None) -> torch.Tensor:
    """One random ``size`` x ``size`` window per sample of [B, C, H, W] (``None``: all of it).

    The autoencoder is convolutional, so it can learn from crops and still encode whole images
    (SD's VAE trained on 256 px crops, Rombach et al. 2022); a crop of 1/4 of the pixels costs
    about 1/4 of the step.
    """
    check_crop(size)
    b, _, h, w = pixels.shape
    if size is None or (size >= h and size >= w):
        return pixels
    top = torch.randint(0, h - size + 1, (b,)).tolist()
    left = torch.randint(0, w - size + 1, (b,)).tolist()
    return torch.stack(
        [x[:, t : t + size, s : s + size] for x, t, s in zip(pixels, top, left, strict=True)]
    )


def start_near_deterministic(vae: AutoencoderKL, logvar: float) -> None:
    """Start the posterior's log-variance at ``logvar`` (the bias of ``quant_conv``'s second
    half). At diffusers' init the posterior std is about 1, as wide as the latents themselves:
    the decoder then learns from noise-blurred codes and, in short runs, loses the colour of
    small objects."""
    channels = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.bias[channels:].fill_(logvar)


class AutoencoderTraining(L.LightningModule):
    """Trains an AutoencoderKL and measures the latent std that sets `scaling_factor`."""

    def __init__(
        self,
        vae: AutoencoderKL,
        optimizer: OptimizerFactory,
        lr_scheduler: SchedulerFactory | None = None,
        kl_weight: float = 1e-6,
        latent_std_momentum: float = 0.99,
        init_logvar: float | None = None,
        train_crop: int | None = None,
    ) -> None:
        super().__init__()
        self.vae = vae
        if init_logvar is not None:
            start_near_deterministic(vae, init_logvar)
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.kl_weight, self.momentum = kl_weight, latent_std_momentum
        check_crop(train_crop)  # at construction: before any data is read
        self.train_crop = train_crop
        # Running second moment of the latents: stage 2 needs unit-variance latents, and the
        # VAE's `scaling_factor` (1 / std) is how diffusers' pipelines apply that.
        self.register_buffer("latent_sq_mean", torch.tensor(0.0))
        self.register_buffer("latent_mean", torch.tensor(0.0))
        self.register_buffer("stats_steps", torch.tensor(0, dtype=torch.long))

    tokenizer = None  # images only: the data module skips tokenization
    flops_per_batch = None  # MFU is reported for the diffusion stage only

    @property
    def latent_std(self) -> float:
        var = self.latent_sq_mean - self.latent_mean.pow(2)
        return float(var.clamp_min(1e-8).sqrt())

    def _update_latent_stats(self, z: torch.Tensor) -> None:
        z = z.detach().float()
        m = 0.0 if self.stats_steps == 0 else self.momentum
        self.latent_mean.mul_(m).add_((1 - m) * z.mean())
        self.latent_sq_mean.mul_(m).add_((1 - m) * z.pow(2).mean())
        self.stats_steps += 1

    def autoencoder_loss(
        self, pixels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        posterior = self.vae.encode(pixels).latent_dist
        z = posterior.sample()
        recon = self.vae.decode(z).sample
        rec = reconstruction_loss(recon, pixels)
        kl = kl_divergence(posterior.mean, posterior.logvar).mean()
        if self.training:
            self._update_latent_stats(z)
        return rec + self.kl_weight * kl, {"rec": rec.detach(), "kl": kl.detach()}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        pixels = random_crop(batch["pixel_values"], self.train_crop)
        loss, parts = self.autoencoder_loss(pixels)
        bs = batch["pixel_values"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log_dict({f"train/{k}": v for k, v in parts.items()}, batch_size=bs)
        self.log("train/latent_std", self.latent_std, batch_size=bs)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, parts = self.autoencoder_loss(batch["pixel_values"])
        self.log("val/loss", loss, prog_bar=True, batch_size=batch["pixel_values"].shape[0])
        return loss

    def configure_optimizers(self):
        return optimizer_config(
            self.vae.parameters(), self.optimizer_factory, self.lr_scheduler_factory
        )

    @torch.no_grad()
    def preview(self, batch: dict | None, prompts: list[str] | None = None, **_) -> Image.Image:
        """Originals (top row) over their reconstructions (bottom row)."""
        pixels = batch["pixel_values"][:8].to(self.device)
        was_training = self.vae.training
        self.vae.eval()
        try:
            recon = self.vae.decode(self.vae.encode(pixels).latent_dist.mode()).sample
        finally:
            self.vae.train(was_training)
        images = [to_pil(x) for x in torch.cat([pixels, recon])]
        return image_grid(images, cols=len(pixels))

    def export(self, out_dir: str | Path) -> Path:
        """Write the VAE in diffusers layout, with `scaling_factor` = 1 / measured latent std."""
        if int(self.stats_steps) == 0:
            raise RuntimeError("no training step has measured the latent std; train before export")
        self.vae.register_to_config(scaling_factor=1.0 / self.latent_std)
        with atomic_dir(out_dir) as tmp:
            self.vae.save_pretrained(tmp, safe_serialization=True)
        return Path(out_dir)


def to_pil(x: torch.Tensor) -> Image.Image:
    """[3, H, W] in [-1, 1] -> PIL image."""
    arr = ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)
