"""The backbone seam: `prediction = backbone(x_t, t, conditioning)` over a diffusers denoiser.

One adapter per kind of model (UNets, each transformer family). The adapter owns everything that
depends on the model's call convention, so the task, callbacks, EMA, sharding and export work on
`backbone.model` (the diffusers model that trains and that the export writes) and never name it.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from train.errors import ConfigError
from train.models import adapters
from train.models.conditioning import Conditioning
from train.models.unwrap import model_class
from train.objectives.base import Noised, weighted_mse


class Backbone(nn.Module):
    """Base of the adapters; `model` is the diffusers model (a registered submodule)."""

    # The pipeline's name for the model (its `save_pretrained` subfolder) and pipeline class.
    component = "unet"
    pipeline_class = "StableDiffusionPipeline"
    # Which objectives' schedulers the pipeline can sample with (`Objective.kind`).
    sampled_by: tuple[str, ...] = ("ddpm",)
    # The config key of the model's settings, for messages.
    setting = "model.backbone.model"
    # Whether the pipeline decodes `latents / scaling_factor + shift_factor` (SD3, Flux): the
    # VAE config must then set shift_factor, and training subtracts it (as their scripts do).
    needs_shift_factor = False
    # Whether the model reads a mask and the masked image's latents (`cond.inpaint`).
    inpainting = False

    def __init__(
        self, model: nn.Module, gradient_checkpointing: bool = False, adapter: Any = None
    ) -> None:
        """``adapter``: a peft config (``LoraConfig``, ``LoHaConfig``, ``LoKrConfig``); then only
        the adapter trains and ``model`` (e.g. a pretrained base) stays frozen."""
        super().__init__()
        self.model = model.train()  # from_pretrained returns it in eval mode
        self.adapter = adapter
        if adapter is not None:
            adapters.attach(model, adapter)
        if gradient_checkpointing:
            model.enable_gradient_checkpointing()

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def latent_channels(self) -> int:
        return int(self.model.config.in_channels)

    # Where `sample_size` is set, for messages.
    sample_size_setting = "model.backbone.model.sample_size"

    @property
    def sample_size(self) -> int:
        """The latent side it generates by default (pipelines read it)."""
        return int(self.model.config.sample_size)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self.predict(self.model, x_t, t, cond)

    @staticmethod
    def predict(model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning):
        """`model`'s prediction in the latents' layout: the call convention of its kind (a
        static method so that FLOP counting can call it on a meta-device copy)."""
        raise NotImplementedError

    def check(self, latent_channels: int, conditioner: Any, objective: Any) -> None:
        """ConfigError with the setting to change when the parts cannot work together."""
        if self.latent_channels != latent_channels:
            raise ConfigError(
                f"{self.setting}.in_channels={self.latent_channels} but the VAE has "
                f"latent_channels={latent_channels}; set {self.setting}.in_channels (and "
                "out_channels) to the VAE's latent_channels, or use a VAE with "
                f"{self.latent_channels} latent channels"
            )
        if objective.kind not in self.sampled_by:
            raise ConfigError(
                f"model.objective is {type(objective).__name__} ({objective.kind}) but "
                f"{self.pipeline_class} samples only with {' or '.join(self.sampled_by)} "
                f"schedulers; choose model/objective={self.sampled_by[0]}"
            )

    def loss(self, prediction: torch.Tensor, noised: Noised, cond: Conditioning) -> torch.Tensor:
        """The training loss of a micro-batch (the objective's weighted MSE)."""
        return weighted_mse(prediction, noised.target, noised.weights)

    def sample_inputs(self, batch: dict | None, n: int) -> dict[str, Any]:
        """Image arguments of the pipeline call for `n` previews from a training batch (a
        ControlNet's control images, an inpainting model's images and masks); {} for none."""
        return {}

    def encode_control(self, control: torch.Tensor | None, vae: Any) -> torch.Tensor | None:
        """The control image as the model reads it; pixels [B, 3, H, W] in [0, 1] here (a UNet
        ControlNet embeds them itself), VAE latents for the transformers' ControlNets."""
        return control

    def check_scale_factor(self, factor: int) -> None:
        """ConfigError when the model cannot work over a VAE that downsamples `factor`x."""

    def check_temporal_factor(self, factor: int) -> None:
        """ConfigError when the model cannot work over a VAE that packs `factor` frames into a
        latent frame (image models see no frames; a video model's frame count must fit)."""
        if factor != 1 and not getattr(self, "video", False):
            raise ConfigError(
                f"the VAE compresses time {factor}x (a video VAE), but {type(self).__name__} "
                "generates images: use an image VAE (model/vae=...) or a video backbone"
            )

    def frozen_parts(self) -> dict[str, nn.Module]:
        """Frozen pipeline components the backbone holds besides `model` (a ControlNet's base
        UNet), by their pipeline name: exported and recorded beside the VAE."""
        return {}

    def train_flops(self, batch: int, latent: tuple[int, ...], cond: Conditioning) -> int:
        """FLOPs of one training step (forward + backward) of a micro-batch."""
        from train.models.flops import train_flops

        return train_flops(self, batch, latent, cond)

    def pipeline_extras(self) -> dict[str, Any]:
        """Further pipeline constructor arguments (plain values) besides the components."""
        return {}

    def pipeline_call_kwargs(self) -> dict[str, Any]:
        """Further pipeline call arguments (besides prompts, steps, guidance, generator, size)
        that sampling needs, e.g. PixArt's max_sequence_length."""
        return {}

    def wrap_units(self) -> set[type[nn.Module]]:
        """The block classes FSDP wraps as units (sharded and gathered one at a time)."""
        return set()

    def from_state(self, state: dict[str, torch.Tensor]) -> nn.Module:
        """A plain copy of `model` holding `state` (gathered shards, EMA weights); `state` may
        hold the trained weights alone (an adapter's, motion modules': such a run's EMA): the
        copy keeps the live model's frozen ones."""
        # Counted, not compared with state_dict(): under FSDP that is a collective, and this
        # runs on rank 0 alone. A state with fewer entries than parameters is the trained part's.
        if len(state) < sum(1 for _ in self.model.parameters()):
            return self._partial_from_state(state)
        model = model_class(self.model).from_config(self.model.config)
        if self.adapter is not None:
            adapters.attach(model, self.adapter)
        model.load_state_dict(state, strict=True)
        return model

    def _partial_from_state(self, state: dict[str, torch.Tensor]) -> nn.Module:
        model = copy.deepcopy(self.model)
        missing = sorted(adapters.trainable_keys(model) - set(state))
        unexpected = sorted(set(state) - set(model.state_dict()))
        if missing or unexpected:
            raise ValueError(f"the trained weights do not fit the model: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")  # fmt: skip
        model.load_state_dict(state, strict=False)
        return model
