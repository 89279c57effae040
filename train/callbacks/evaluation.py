"""Image quality while training: FID, KID and CLIP score of images generated for a fixed prompt
set, every N steps and at the end, logged as ``eval/*`` and put on the registered model."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn

from train.callbacks.outputs import (
    check_whole_weights,
    needs_whole_state,
    text_weights,
    whole_state,
)
from train.callbacks.preemption import preempted
from train.errors import ConfigError
from train.evaluation.metrics import ImageMetrics
from train.evaluation.prompts import prompt_set
from train.evaluation.reference import check_resolution, load_reference
from train.tasks import pipelines
from train.tracking.tags import tag_registered_version


class ImageQuality(L.Callback):
    """Generates ``num_images`` images (prompt i with seed ``seed + i``, so the images do not
    depend on the world size), each rank its share; FID and KID against ``reference`` (from
    ``ldm-data stats`` on the validation set), CLIP score with ``clip_model``."""

    def __init__(self, feature: nn.Module, reference: str, val_urls: str | None = None,
                 prompts: str | None = None, num_images: int = 64, every_n_steps: int = 0,
                 num_inference_steps: int = 20, guidance_scale: float = 4.0, seed: int = 0,
                 batch_size: int = 16, clip_model: str | None = None,
                 kid_subset_size: int = 100) -> None:  # fmt: skip
        self.feature, self.num_images, self.every_n_steps = feature, num_images, every_n_steps
        self.steps, self.guidance_scale, self.seed = num_inference_steps, guidance_scale, seed
        self.batch_size, self.clip_model = batch_size, clip_model
        self.kid_subset_size = kid_subset_size
        # Checked here, when the config is built: before the model, the data and any step.
        self.reference = load_reference(reference, val_urls, feature)
        self.reference_path = reference
        missing = "callbacks.eval needs prompts=FILE or val_urls (data.val_urls)"
        self.prompts = prompt_set(prompts, val_urls, num_images, "callbacks.eval.prompts", missing)
        self.metrics: ImageMetrics | None = None  # built in setup: its share needs the rank

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        check_whole_weights(trainer, pl_module)
        check_resolution(self.reference_path, pl_module.resolution, "callbacks.eval.reference")
        if self.num_images < 2 * trainer.world_size:
            raise ConfigError(f"callbacks.eval.num_images={self.num_images}: at least 2 per "
                              f"rank ({trainer.world_size} ranks)")  # fmt: skip
        # Contiguous shares: gathered in rank order they are the one-process order, so KID's
        # random subsets pick the same features on any world size.
        share = torch.tensor_split(self.reference, trainer.world_size)[trainer.global_rank]
        self.metrics = ImageMetrics(self.feature, share, self.clip_model, self.kid_subset_size)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step < trainer.max_steps:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if preempted(trainer):
            return
        metrics = self.evaluate(trainer, pl_module)
        if trainer.is_global_zero:
            tag_registered_version(trainer, {f"eval.{k}": v for k, v in metrics.items()})

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Collective: every rank generates its share and the metrics are reduced over ranks."""
        model = self._whole_model(trainer, pl_module)
        metrics = self.metrics.to(pl_module.device)
        shares = torch.tensor_split(torch.arange(self.num_images), trainer.world_size)
        mine = shares[trainer.global_rank].tolist()
        with text_weights(trainer, pl_module):
            for start in range(0, len(mine), self.batch_size):
                chunk = mine[start : start + self.batch_size]
                images = self._generate(pl_module, chunk, model)
                metrics.update(images, [self.prompts[i] for i in chunk])
        scores = metrics.compute()
        metrics.reset()  # the generated side only: the reference stays
        logged = {f"eval/{k}": v for k, v in scores.items()}
        for key, value in logged.items():  # what a sweep's optimized_metric reads
            trainer.callback_metrics[key] = torch.tensor(value)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(logged, step=trainer.global_step)
        return scores

    def _generate(self, pl_module, indices: list[int], model) -> torch.Tensor:
        """uint8 images [N, 3, H, W] for prompts ``indices``, one seeded generator each."""
        gens = [torch.Generator(device="cpu").manual_seed(self.seed + i) for i in indices]
        prompts = [self.prompts[i] for i in indices]
        images = pipelines.generate(pl_module, prompts, gens, self.steps, self.guidance_scale,
                                    model, output_type="pt")  # fmt: skip
        return (images.clamp(0, 1) * 255).round().to(torch.uint8)

    @staticmethod
    def _whole_model(trainer: L.Trainer, pl_module: L.LightningModule) -> nn.Module | None:
        """Collective: the weights to evaluate on every rank (EMA, gathered), None for live."""
        if not needs_whole_state(trainer):
            return None
        state = [whole_state(trainer, pl_module)]
        if trainer.world_size > 1:  # rank 0 holds them: every rank generates its share
            torch.distributed.broadcast_object_list(state, src=0)
        return pl_module.model_from_state(state[0])
