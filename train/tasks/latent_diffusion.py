"""Stage 2: a LightningModule training a denoiser in a frozen VAE's latent space.

One generic step for every family: encode (VAE latents, text conditioning) -> objective (noise,
timesteps, target) -> backbone (prediction) -> loss. What differs between SD 1.x, SDXL and the
transformers lives in the three seams it holds: `backbone`, `conditioner`, `objective`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from PIL import Image
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel

from train.distributed.sharding import clean_name
from train.models import adapters
from train.models.backbones.base import Backbone
from train.models.conditioning import Conditioning
from train.models.parts import (
    FrozenParts,
    normalize_latents,
    posterior_of,
    vae_latent_channels,
    vae_scale_factor,
    vae_temporal_factor,
)
from train.models.vae_tiling import VaeTiling
from train.objectives.base import per_sample_mse, stratified_levels
from train.tasks import first_frame, inpainting, pipelines
from train.tasks.clips import Clips
from train.tasks.fit_checks import check_shift_factor, check_text_adapter
from train.tasks.optim import OptimizerFactory, SchedulerFactory, optimizer_config
from train.tasks.rng import SampleRNG, row_offset
from train.tasks.validation import FixedLevelLoss, rows_of_rank, sample_ids, select_rows

VALIDATION_STEP = -1  # the "step" key of validation draws: apart from every training step


class LatentDiffusion(L.LightningModule):
    """Frozen AutoencoderKL and text conditioner, trainable backbone (Rombach et al. 2022)."""

    def __init__(
        self,
        backbone: Backbone,
        vae: AutoencoderKL,
        conditioner: Any,
        objective: Any,
        optimizer: OptimizerFactory,
        lr_scheduler: SchedulerFactory | None = None,
        caption_dropout: float = 0.1,
        noise_seed: int = 0,
        validation_levels: int = 8,
        base: str | None = None,
        vae_tiling: VaeTiling | None = None,
    ) -> None:
        """``base``: the pretrained pipeline (folder or hub id) a fine-tuning run starts from;
        the config's parts load from it (``${model.base}``), and the saved config is where
        ``ldm-export`` finds it again for an adapter checkpoint. ``vae_tiling``: encode and
        decode (previews too) in tiles."""
        super().__init__()
        self.base = base
        if vae_tiling is not None:
            vae_tiling.apply(vae)
        backbone.check(vae_latent_channels(vae), conditioner, objective)
        check_shift_factor(backbone, vae)
        backbone.check_scale_factor(vae_scale_factor(vae))
        backbone.check_temporal_factor(vae_temporal_factor(vae))
        self.backbone = backbone
        # The frozen parts are kept out of the module tree, so DDP, FSDP and DeepSpeed wrap,
        # shard and checkpoint only what trains, and every rank holds a whole VAE and text
        # encoder (ZeRO-3 would otherwise gather them on every forward). `_apply` moves them.
        self._frozen = FrozenParts(vae, conditioner)
        self.objective = objective
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.caption_dropout, self.noise_seed = caption_dropout, noise_seed
        vae.requires_grad_(False).eval()
        if getattr(conditioner, "adapter", None) is None:
            conditioner.requires_grad_(False)
        else:
            check_text_adapter(backbone)
            # Registered, unlike the frozen parts: DDP then reduces the adapter's gradients and
            # the checkpoint holds its weights (the encoder's frozen base stays out of both).
            self.trained_conditioner = conditioner
        # With an adapter, checkpoints hold only what trains; the base comes from model.base.
        self.strict_loading = backbone.adapter is None
        self._val = FixedLevelLoss(validation_levels)
        self._flops: dict[tuple, int] = {}
        self.flops_per_batch: int | None = None

    @property
    def trainable(self) -> nn.Module:
        """The diffusers model that trains: what EMA, sharding, clipping and export address."""
        return self.backbone.model

    @property
    def vae(self) -> AutoencoderKL:
        return self._frozen.vae

    @property
    def conditioner(self) -> Any:
        return self._frozen.conditioner

    @property
    def tokenizer(self) -> Any:
        return getattr(self.conditioner, "tokenizer", None)

    def _apply(self, fn, recurse: bool = True):
        # .to()/.cuda()/.half() reach the unregistered frozen parts too.
        super()._apply(fn, recurse)
        if recurse:
            self.vae._apply(fn)
            if getattr(self, "trained_conditioner", None) is None:  # else moved as a child
                self.conditioner._apply(fn)
        return self

    def on_fit_start(self) -> None:
        # FSDP moves only the parameters it wraps; the frozen parts follow the root device.
        device = self.trainer.strategy.root_device
        self.vae.to(device)
        self.conditioner.to(device)
        for part in self.backbone.frozen_parts().values():
            part.to(device)

    @property
    def resolution(self) -> int:
        return self.backbone.sample_size * vae_scale_factor(self.vae)

    def train(self, mode: bool = True) -> LatentDiffusion:
        super().train(mode)
        self.vae.eval()  # frozen parts never switch to train mode
        self.conditioner.train(False)
        return self

    def caption_drop_mask(self, rng: SampleRNG) -> torch.Tensor | None:
        """Which captions become the empty prompt (Ho & Salimans 2022, CFG); None when none can
        (evaluation, or no dropout)."""
        if not self.training or self.caption_dropout <= 0:
            return None
        return rng.rand() < self.caption_dropout

    def batch_latents(self, batch: dict, rng: SampleRNG) -> torch.Tensor:
        """Scaled latents [B, C, h, w] (clips: [B, C, F, h, w]) sampled from the VAE posterior:
        precomputed moments when the batch has them (``ldm-data encode`` shards), else by
        encoding ``pixel_values``."""
        if "latent_moments" in batch:
            posterior = DiagonalGaussianDistribution(batch["latent_moments"].to(self.vae.dtype))
        else:
            with torch.no_grad():
                pixels = batch["pixel_values"].to(self.vae.dtype)
                posterior = posterior_of(self.vae, pixels)
        eps = rng.randn(tuple(posterior.mean.shape[1:]), posterior.mean.dtype)
        return normalize_latents(self.vae, posterior.mean + posterior.std * eps)

    def batch_conditioning(self, batch: dict, rng: SampleRNG | None) -> Conditioning:
        """The conditioner's output with caption dropout, plus SDXL's size micro-conditioning
        and a ControlNet's control image from the batch when the data provides them."""
        drop = self.caption_drop_mask(rng) if rng is not None else None
        cond = self.conditioner.encode(batch, drop)
        control = self.backbone.encode_control(batch.get("control_values"), self.vae)
        return cond.with_sizes(batch_sizes(batch, cond.hidden)).with_control(control)

    def diffusion_step(self, batch: dict, rng: SampleRNG) -> torch.Tensor:
        """The training loss of one micro-batch; every random draw comes from ``rng``."""
        x0 = self.batch_latents(batch, rng)
        cond = self.batch_conditioning(batch, rng)
        noised = self.objective.draw(x0, rng)
        cond = self.with_inpaint_inputs(batch, cond, rng)
        self._count_flops(x0, cond)
        prediction = self.backbone(noised.x_t.to(self.dtype), noised.timesteps, cond)
        return self.backbone.loss(prediction, noised, cond)

    def with_inpaint_inputs(self, batch: dict, cond: Conditioning, rng: SampleRNG) -> Conditioning:
        """`cond` with an inpainting backbone's mask and masked-image latents (drawn after the
        noise, so the other draws are those of a text-to-image run), or an image-to-video
        backbone's first-frame mask and latents; `cond` for the others."""
        if getattr(self.backbone, "first_frame", False):
            return cond.with_inpaint(first_frame.inputs(self, batch))
        if not self.backbone.inpainting:
            return cond
        return cond.with_inpaint(inpainting.inputs(self, batch, rng))

    def _count_flops(self, x0: torch.Tensor, cond: Conditioning) -> None:
        # Lightning's ThroughputMonitor reads `flops_per_batch` for its MFU metric.
        key = (tuple(x0.shape), *(tuple(v.shape) for v in cond.to_dict().values()))
        if key not in self._flops:
            self._flops[key] = self.backbone.train_flops(len(x0), tuple(x0.shape[1:]), cond)
        self.flops_per_batch = self._flops[key]

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

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        n = len(batch["key"])
        loss = self.diffusion_step(batch, self.training_rng(n, batch_idx))
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val.reset(self.device)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Unweighted MSE at fixed noise levels, level and noise keyed by each sample's key (so
        neither the loader's order nor the split matters), each rank scoring its share of the
        batch: over the same validation set, the same number on any world size."""
        n = len(batch["key"])
        rows = rows_of_rank(batch_idx * n, n, self.global_rank, self.trainer.world_size)
        # A rank without rows still runs one (not counted): under ZeRO-3 and FSDP the forward
        # is a collective that every rank must join.
        counted = len(rows) > 0
        rows = rows if counted else torch.tensor([batch_idx * n])
        sub = select_rows(batch, rows - batch_idx * n, n)
        ids = sample_ids(sub["key"])
        rng = SampleRNG([SampleRNG.seed_of(self.noise_seed, VALIDATION_STEP, int(i))
                         for i in ids], self.device)  # fmt: skip
        x0 = self.batch_latents(sub, rng)
        cond = self.batch_conditioning(sub, None)
        levels = stratified_levels(ids, self._val.bins)
        noise = rng.randn(tuple(x0.shape[1:]), x0.dtype)
        noised = self.objective.at_levels(x0, noise, levels)
        cond = self.with_inpaint_inputs(sub, cond, rng)
        prediction = self.backbone(noised.x_t.to(self.dtype), noised.timesteps, cond)
        if counted:
            self._val.add(per_sample_mse(prediction, noised.target), ids)

    def on_validation_epoch_end(self) -> None:
        sums, counts = self._val.reduced(self.trainer.strategy)
        if counts.sum() == 0:
            return
        self.log("val/loss", float(sums.sum() / counts.sum()), prog_bar=True, rank_zero_only=True)
        self.log("val/samples", float(counts.sum()), rank_zero_only=True)  # over all ranks
        for i in range(self._val.bins):
            if counts[i] > 0:
                self.log(f"val/loss_level{i}", float(sums[i] / counts[i]), rank_zero_only=True)

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
        params = [p for p in self.trainable.parameters() if p.requires_grad]
        if getattr(self, "trained_conditioner", None) is not None:  # a text-encoder adapter
            params += [p for p in self.trained_conditioner.parameters() if p.requires_grad]
        return optimizer_config(params, self.optimizer_factory, self.lr_scheduler_factory)

    def model_from_state(self, state: dict[str, torch.Tensor]) -> nn.Module:
        """A plain copy of the trainable model holding ``state`` (e.g. gathered from shards, or
        EMA weights), on this module's device."""
        model = self.backbone.from_state(state)
        return model.to(device=self.vae.device, dtype=self.vae.dtype).eval()

    def pipeline(self, scheduler: Any = None, model: nn.Module | None = None) -> Any:
        """The family's diffusers pipeline over this module's components (shared, not copied);
        ``model`` replaces the trained one (gathered or EMA weights)."""
        return pipelines.build(self, scheduler, model)

    @torch.no_grad()
    def preview(
        self,
        batch: dict | None,
        prompts: list[str] | None = None,
        seed: int = 0,
        num_inference_steps: int = 25,
        guidance_scale: float = 4.0,
        model: nn.Module | None = None,
    ) -> Image.Image | Clips:
        """A grid of samples for `prompts` (or the batch's captions) from diffusers' pipeline; a
        ControlNet's with the batch's control images, an inpainting model's on its images; a
        video model's clips (their `save` writes a frame strip, an mp4 and a GIF)."""
        prompts = prompts or list(batch["caption"])[:8]
        return pipelines.preview(
            self, prompts, seed, num_inference_steps, guidance_scale, model, batch
        )

    def export(self, out_dir: str | Path, model: nn.Module | None = None) -> Path:
        """Write a diffusers-layout folder (safetensors); replaces `out_dir` atomically.
        ``model``: the weights to write instead of the live ones (gathered shards, EMA)."""
        return pipelines.export(self, out_dir, model)

    def export_lora(self, out_dir: str | Path, model: nn.Module | None = None) -> Path:
        """Write the trained LoRA in diffusers' format (`load_lora_weights` reads it)."""
        return pipelines.export_lora(self, out_dir, model)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # What ldm-export rebuilds the pipeline from: the diffusers configs, not our classes.
        from train.tasks.parts_spec import describe

        checkpoint["ldm_parts"] = describe(self)
        if self.backbone.adapter is not None:
            # A LoRA checkpoint is the adapter (and its optimizer state), not a copy of the base.
            # DeepSpeed writes the weights itself (without the frozen ones, strict_loading off)
            # and drops this dict's state_dict: the names stored here are checked on load.
            keys = self._adapter_keys()
            checkpoint["adapter_keys"] = sorted(keys)
            if "state_dict" in checkpoint:
                checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                            if k in keys}  # fmt: skip

    def _adapter_keys(self) -> set[str]:
        # Under FSDP the module tree holds wrappers; state-dict keys have none.
        return {clean_name(k) for k in adapters.trainable_keys(self)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.backbone.adapter is not None:
            saved = checkpoint["state_dict"] if "state_dict" in checkpoint else \
                checkpoint.get("adapter_keys", ())  # fmt: skip
            missing = sorted(self._adapter_keys() - set(saved))
            if missing:
                raise ValueError(
                    f"the checkpoint lacks {len(missing)} of the adapter's weights ({missing[0]}"
                    ", ...): it was written for another adapter (target modules, rank) or model"
                )


def batch_sizes(batch: dict, like: torch.Tensor) -> torch.Tensor | None:
    """SDXL micro-conditioning [B, 6] (original h, w; crop top, left; target h, w) from the
    batch's ``original_size``, ``crop_top_left`` and ``target_size`` (Podell et al. 2023, 2.2)."""
    keys = ("original_size", "crop_top_left", "target_size")
    if not all(k in batch for k in keys):
        return None
    parts = [torch.as_tensor(batch[k], device=like.device).reshape(len(like), 2) for k in keys]
    return torch.cat(parts, dim=1).to(like.dtype)
