"""AnimateDiff (Guo et al. 2023): motion modules over a trained image UNet, whose weights stay
frozen; clips of latents [B, C, F, h, w] from a per-frame 2D VAE.

diffusers' `UNetMotionModel.from_unet2d` copies the image UNet's blocks and inserts a temporal
transformer after each; `AnimateDiffPipeline` samples it. The export is that pipeline's folder,
and `motion_adapter/` beside it holds the motion modules alone (what AnimateDiff users share and
load over another image model with `MotionAdapter.from_pretrained`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel
from torch import nn

from train.errors import ConfigError
from train.models.backbones.unet import UNetBackbone, added_cond_kwargs
from train.models.conditioning import Conditioning

SETTING = "model.backbone.unet"
MOTION_ADAPTER_DIR = "motion_adapter"  # in an export: the motion modules alone
# What UNetMotionModel cannot hold of an image UNet's config: (key, the values it can, why).
# from_unet2d drops these keys silently and then fails on a shape mismatch, or (for the
# embeddings) builds a model that ignores weights the image UNet was trained with.
UNSUPPORTED = (
    ("addition_embed_type", (None, "text_time"), "its pooled-text embedding"),
    ("resnet_time_scale_shift", ("default",), "scale-shift ResNets"),
    ("class_embed_type", (None,), "class embeddings"),
    ("time_embedding_type", ("positional",), "Fourier time embeddings"),
    ("flip_sin_to_cos", (True,), "its time embedding layout"),
    ("freq_shift", (0,), "its time embedding layout"),
    ("encoder_hid_dim_type", (None,), "an encoder projection"),
    ("mid_block_type", ("UNetMidBlock2DCrossAttn",), "another mid block"),
    ("only_cross_attention", (False,), "cross-attention-only blocks"),
    ("dual_cross_attention", (False,), "dual cross-attention"),
    ("conv_in_kernel", (3,), "another input kernel"),
    ("conv_out_kernel", (3,), "another output kernel"),
)


def unet_problems(unet: dict[str, Any], adapter: dict[str, Any] | None) -> list[str]:
    """Why `UNetMotionModel.from_unet2d` cannot take this image UNet (and adapter) config."""
    problems = [
        f"{SETTING}.{key}={unet[key]!r} ({why}, which AnimateDiff's UNetMotionModel lacks; it "
        f"takes {' or '.join(map(repr, ok))})"
        for key, ok, why in UNSUPPORTED
        if key in unet and unet[key] not in ok
    ]
    if adapter is None:
        return problems
    layers = unet["layers_per_block"]
    blocks = len(unet["down_block_types"])
    if list(adapter["block_out_channels"]) != list(unet["block_out_channels"]):
        problems.append(
            f"model.backbone.motion_adapter.block_out_channels={list(adapter['block_out_channels'])}"
            f" but the image UNet's are {list(unet['block_out_channels'])}: set them equal"
        )
    motion_layers = adapter["motion_layers_per_block"]
    as_list = (lambda v: [v] * blocks if isinstance(v, int) else list(v))  # noqa: E731
    if as_list(motion_layers) != as_list(layers):
        problems.append(
            f"model.backbone.motion_adapter.motion_layers_per_block={motion_layers} but the image"
            f" UNet's layers_per_block is {layers}: set them equal"
        )
    return problems


def save_motion_adapter(model: Any, export: str | Path) -> None:
    """`export`/motion_adapter/: a motion UNet's motion modules alone, which
    `MotionAdapter.from_pretrained` loads over another image model (AnimateDiffPipeline's
    from_pretrained ignores the folder); nothing for other models."""
    if isinstance(model, UNetMotionModel):
        model.save_motion_modules(str(Path(export) / MOTION_ADAPTER_DIR))


def zero_motion_outputs(model: UNetMotionModel) -> None:
    """Zero each temporal transformer's output projection, so the motion UNet starts out as the
    image UNet applied frame by frame (Guo et al. 2023, 4.3; diffusers' MotionAdapter does not)."""
    for name, module in model.named_modules():
        if "motion_modules" in name and name.endswith("proj_out"):
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)


class MotionUNetBackbone(UNetBackbone):
    """A `UNetMotionModel`: an image UNet (SD 1.x/2.x or SDXL) with trainable motion modules."""

    setting = SETTING
    sample_size_setting = f"{SETTING}.sample_size"
    video = True
    # An adapter (a LoRA on the image UNet) trains beside the motion modules: alone it is not
    # the model, so only merged exports are written.
    trains_besides_adapter = True

    def __init__(
        self,
        unet: UNet2DConditionModel | UNetMotionModel,
        motion_adapter: MotionAdapter | Callable[..., MotionAdapter] | None = None,
        num_frames: int = 16,
        fps: int = 8,
        zero_init: bool = True,
        train_image_weights: bool = False,
        gradient_checkpointing: bool = False,
        adapter: Any = None,
    ) -> None:
        """``unet``: the image UNet (often a trained export's, ``from_pretrained(subfolder=
        "unet")``), or a motion UNet to go on training; ``motion_adapter``: new or pretrained
        motion modules (None: the motion UNet's own), or a partial MotionAdapter that gets the
        image UNet's block_out_channels and layers_per_block; ``num_frames``, ``fps``: the
        clips' (previews sample that many frames, written at that rate); ``zero_init``: start
        new motion modules as the identity (off for a pretrained adapter);
        ``train_image_weights``: train the image layers too (AnimateDiff keeps them frozen)."""
        if callable(motion_adapter) and not isinstance(motion_adapter, nn.Module):
            cfg = unet.config
            motion_adapter = motion_adapter(
                block_out_channels=tuple(cfg.block_out_channels),
                motion_layers_per_block=cfg.layers_per_block,
            )
        model = self._motion_model(unet, motion_adapter, zero_init)
        if num_frames > int(model.config.motion_max_seq_length):
            raise ConfigError(
                f"data.video.num_frames={num_frames} but the motion modules' positions end at "
                f"motion_max_seq_length={model.config.motion_max_seq_length}; sample at most "
                "that many frames or set model.backbone.motion_adapter.motion_max_seq_length"
            )
        if train_image_weights and adapter is not None:
            raise ConfigError(
                "model.backbone.train_image_weights=true trains the image UNet whole, "
                "model.backbone.adapter an adapter on it: set one"
            )
        if not train_image_weights:
            model.freeze_unet2d_params()
        super().__init__(model, gradient_checkpointing, adapter)
        if adapter is not None:  # peft freezes all but the adapter: the motion modules train too
            for name, param in model.named_parameters():
                if "motion_modules" in name:
                    param.requires_grad_(True)
        self.num_frames, self.fps = num_frames, fps
        self.pipeline_class = "AnimateDiffSDXLPipeline" if self.is_sdxl else "AnimateDiffPipeline"

    @staticmethod
    def _motion_model(unet: nn.Module, motion_adapter: MotionAdapter | None, zero_init: bool):
        if isinstance(unet, UNetMotionModel):
            if motion_adapter is not None:
                unet.load_motion_modules(motion_adapter)
            return unet
        problems = unet_problems(dict(unet.config), motion_adapter and dict(motion_adapter.config))
        if problems:
            raise ConfigError("the image UNet cannot take motion modules: " + "; ".join(problems))
        model = UNetMotionModel.from_unet2d(unet, motion_adapter)
        if zero_init:
            zero_motion_outputs(model)
        return model

    @staticmethod
    def predict(model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning):
        """x_t: [B, C, F, h, w]. The text conditions every frame: UNetMotionModel wants it
        repeated per frame (AnimateDiffPipeline does so too)."""
        hidden = cond.hidden.repeat_interleave(x_t.shape[2], dim=0)  # [B * F, L, D]
        added = added_cond_kwargs(model, cond)
        return model(x_t, t, encoder_hidden_states=hidden, added_cond_kwargs=added).sample

    def check_temporal_factor(self, factor: int) -> None:
        if factor != 1:
            raise ConfigError(
                f"the VAE compresses time {factor}x, but AnimateDiff's motion modules run over an "
                "image UNet whose latents are one per frame: use its image VAE (a per-frame 2D "
                "VAE), or a video transformer for a video VAE (model/backbone=wan)"
            )

    def pipeline_extras(self) -> dict[str, Any]:
        extras = {"motion_adapter": None}  # the motion UNet holds the modules
        return extras | ({"force_zeros_for_empty_prompt": False} if self.is_sdxl else {})

    def pipeline_call_kwargs(self) -> dict[str, Any]:
        return {"num_frames": self.num_frames}

    def wrap_units(self) -> set[type[nn.Module]]:
        from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

        return super().wrap_units() | {AnimateDiffTransformer3D}
