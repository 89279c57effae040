"""Wan (Wan Team 2025, "Wan: Open and Advanced Large-Scale Video Generative Models"): a video
DiT, `WanTransformer3DModel`, over a causal 3D VAE's latents (`AutoencoderKLWan`: clips of
1 + 4k frames -> [B, 16, 1 + k, H / 8, W / 8], normalised per channel), trained with rectified
flow and sampled by `WanPipeline`.

Image-to-video is the Wan 2.2 I2V layout (no CLIP image encoder): the input channels hold the
noisy latents, a first-frame mask and the latents of the first frame followed by black frames,
as `WanImageToVideoPipeline` builds them (train/tasks/first_frame.py makes them in training).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from train.errors import ConfigError
from train.models.backbones.base import Backbone
from train.models.conditioning import Conditioning

SETTING = "model.backbone.model"


def nearest_frame_counts(n: int, factor: int) -> list[int]:
    """The counts 1 + factor * k either side of `n` (a causal VAE's: the first frame alone)."""
    below = 1 + factor * max((n - 1) // factor, 0)
    return sorted({below, below + factor} - {n})


class WanBackbone(Backbone):
    """A diffusers `WanTransformer3DModel` on latents [B, C, F', h, w] and the text's hidden
    states, padding zeroed (WanPipeline zeroes the prompt embeddings past each prompt's end and
    passes no mask to the transformer)."""

    component = "transformer"
    pipeline_class = "WanPipeline"
    sampled_by = ("flow",)
    setting = SETTING
    sample_size_setting = "data.resolution"
    video = True

    def __init__(
        self,
        model: nn.Module,
        resolution: int,
        num_frames: int = 17,
        fps: int = 16,
        gradient_checkpointing: bool = False,
        adapter: Any = None,
    ) -> None:
        """``resolution``: the clips' side in pixels (``${data.resolution}``; the transformer's
        config has no sample size); ``num_frames``, ``fps``: the clips' (previews sample that
        many frames, written at that rate)."""
        super().__init__(model, gradient_checkpointing, adapter)
        self.resolution, self.num_frames, self.fps = int(resolution), int(num_frames), int(fps)
        self.scale_factor = 8  # the VAE's, set by check_scale_factor when the parts meet
        # The conditioner's token count, known at check(): the pipeline must pad prompts to it.
        self.max_sequence_length: int | None = None

    @property
    def latent_channels(self) -> int:
        return int(self.model.config.out_channels)

    @property
    def sample_size(self) -> int:
        return self.resolution // self.scale_factor

    @staticmethod
    def predict(model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning):
        """x_t: [B, C, F', h, w]; an image-to-video model's first-frame inputs (`cond.inpaint`,
        [B, T + C, F', h, w]) go on the channels after it, as the I2V pipeline puts them."""
        hidden = cond.hidden  # [B, L, D]
        if cond.mask is not None:
            hidden = hidden * cond.mask[..., None].to(hidden.dtype)
        x = x_t if cond.inpaint is None else torch.cat([x_t, cond.inpaint.to(x_t.dtype)], dim=1)
        # timestep: sigma * 1000 [B], as the pipeline's FlowMatch scheduler passes it.
        return model(x, timestep=t, encoder_hidden_states=hidden, return_dict=False)[0]

    def input_channels(self, latent_channels: int, temporal_factor: int) -> int:
        """The transformer's in_channels over a VAE with `latent_channels`."""
        return latent_channels

    def check(self, latent_channels: int, conditioner: Any, objective: Any) -> None:
        super().check(latent_channels, conditioner, objective)
        cfg = self.model.config
        if int(cfg.text_dim) != conditioner.hidden_size:
            raise ConfigError(
                f"{SETTING}.text_dim={cfg.text_dim} but the conditioner's hidden size is "
                f"{conditioner.hidden_size}; set {SETTING}.text_dim={conditioner.hidden_size}"
            )
        if cfg.image_dim is not None:
            raise ConfigError(
                f"{SETTING}.image_dim={cfg.image_dim} reads CLIP image embeddings (Wan 2.1 "
                "I2V), which training does not compute; set it to null (image-to-video here "
                "conditions on the first frame's latents: WanImageToVideoBackbone, as in "
                "model/backbone=wan_i2v_tiny)"
            )
        encoder = getattr(conditioner, "model", None)
        if getattr(getattr(encoder, "config", None), "use_attention_mask", True) is False:
            raise ConfigError(
                f"model.conditioner.use_attention_mask=false, but {self.pipeline_class} passes "
                "the padding mask to the text encoder; set model.conditioner.use_attention_mask"
                "=true"
            )
        self.max_sequence_length = int(conditioner.max_length)

    def check_scale_factor(self, factor: int) -> None:
        self.scale_factor = factor
        patch = int(self.model.config.patch_size[-1])
        if self.resolution % (factor * patch):
            raise ConfigError(
                f"data.resolution={self.resolution}: Wan's latents are {factor}x smaller and cut "
                f"into {patch}x{patch} patches, so the side must be a multiple of "
                f"{factor * patch}"
            )

    def check_temporal_factor(self, factor: int) -> None:
        cfg = self.model.config
        want = self.input_channels(self.latent_channels, factor)
        if int(cfg.in_channels) != want:
            raise ConfigError(
                f"{SETTING}.in_channels={cfg.in_channels} but {type(self).__name__} feeds it "
                f"{want} channels over this VAE; set {SETTING}.in_channels={want}"
            )
        if (self.num_frames - 1) % factor:
            near = " or ".join(map(str, nearest_frame_counts(self.num_frames, factor)))
            raise ConfigError(
                f"data.video.num_frames={self.num_frames}: the video VAE packs the first frame "
                f"alone and then {factor} frames per latent frame, so it takes {factor}k+1 "
                f"frames; the nearest valid counts are {near}"
            )

    def pipeline_call_kwargs(self) -> dict[str, Any]:
        if self.max_sequence_length is None:
            raise RuntimeError("WanBackbone.check() has not run: no max_sequence_length")
        return {"num_frames": self.num_frames, "max_sequence_length": self.max_sequence_length}

    def wrap_units(self) -> set[type[nn.Module]]:
        from diffusers.models.transformers.transformer_wan import WanTransformerBlock

        return {WanTransformerBlock}


class WanImageToVideoBackbone(WanBackbone):
    """Wan image-to-video: the clip's first frame conditions it (`WanImageToVideoPipeline`,
    called with ``image=``); in_channels = 2 x the VAE's channels + its temporal factor."""

    pipeline_class = "WanImageToVideoPipeline"
    first_frame = True  # LatentDiffusion adds the first-frame inputs (train/tasks/first_frame)

    def input_channels(self, latent_channels: int, temporal_factor: int) -> int:
        return 2 * latent_channels + temporal_factor  # noisy latents, mask, first frame's

    def sample_inputs(self, batch: dict | None, n: int) -> dict[str, Any]:
        """The first training clip's first frame, for every preview prompt: the pipeline takes
        one image per call (it repeats its latents over the prompts)."""
        if batch is None or "pixel_values" not in batch:
            raise ConfigError("sampling an image-to-video model needs a first frame; previews "
                              "take it from the first training batch")  # fmt: skip
        first = batch["pixel_values"][:1, :, 0]  # [1, 3, H, W] in [-1, 1]
        return {"image": ((first.float() + 1) / 2).clamp(0, 1).cpu()}
