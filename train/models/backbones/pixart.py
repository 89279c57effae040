"""PixArt backbones: `PixArtTransformer2DModel`, a DiT with cross-attention to one text encoder's
hidden states and adaLN-single timestep conditioning (Chen et al. 2023, PixArt-alpha; 2024,
PixArt-Sigma), sampled by `PixArtSigmaPipeline`.

Sigma's pipeline rather than Alpha's: it always passes `added_cond_kwargs` resolution and
aspect ratio as None, which is what training passes (Alpha's pipeline sends real sizes to models
with `use_additional_conditions`, which this adapter refuses), and the real checkpoints this
family starts from (PixArt-Sigma-XL-2-*) are Sigma's. Both take the same components.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from train.errors import ConfigError
from train.models.backbones.base import Backbone
from train.models.backbones.samplers import check_flow_sampler
from train.models.conditioning import Conditioning

PIPELINES = ("PixArtSigmaPipeline", "PixArtAlphaPipeline")


def sampling_kwargs(max_sequence_length: int) -> dict[str, Any]:
    """The call arguments a PixArt pipeline needs besides the prompts: prompts padded to the
    length training padded them to (its default, 300, is longer than small encoders read), no
    resolution binning (it knows only sample sizes 32..256), no caption cleaning (it needs bs4
    and ftfy and would change the text the encoder saw in training)."""
    return {"use_resolution_binning": False, "clean_caption": False,
            "max_sequence_length": int(max_sequence_length)}  # fmt: skip


class PixArtBackbone(Backbone):
    """A diffusers `PixArtTransformer2DModel` conditioned on `Conditioning.hidden` and `.mask`."""

    component = "transformer"
    pipeline_class = "PixArtSigmaPipeline"
    sampled_by = ("ddpm", "flow")
    setting = "model.backbone.model"

    def __init__(
        self, model: nn.Module, gradient_checkpointing: bool = False, adapter: Any = None
    ) -> None:
        super().__init__(model, gradient_checkpointing, adapter)
        # The conditioner's token count, known at check(): the pipeline must pad prompts to it.
        self.max_sequence_length: int | None = None

    @staticmethod
    def predict(model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning):
        out = model(
            x_t,
            encoder_hidden_states=cond.hidden,
            encoder_attention_mask=cond.mask,
            timestep=t,  # DDPM: ints 0..999; flow: sigma * 1000, as the pipeline's schedulers pass
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            return_dict=False,
        )[0]
        # Learned sigma (PixArt's own checkpoints, out_channels = 2 x in): the pipeline keeps
        # the first half as the prediction, so only that half trains.
        return out[:, : x_t.shape[1]]

    def check(self, latent_channels: int, conditioner: Any, objective: Any) -> None:
        super().check(latent_channels, conditioner, objective)
        self._check_shapes(conditioner)
        self._check_mask(conditioner)
        if objective.kind == "flow":
            check_flow_sampler(objective, self.pipeline_class)
        self.max_sequence_length = int(conditioner.max_length)

    def _check_shapes(self, conditioner: Any) -> None:
        cfg, s = self.model.config, self.setting
        if int(cfg.caption_channels) != conditioner.hidden_size:
            raise ConfigError(
                f"{s}.caption_channels={cfg.caption_channels} but the conditioner's hidden size "
                f"is {conditioner.hidden_size}; set {s}.caption_channels={conditioner.hidden_size}"
            )
        inner = int(cfg.num_attention_heads) * int(cfg.attention_head_dim)
        if int(cfg.cross_attention_dim) != inner:
            raise ConfigError(
                f"{s}.cross_attention_dim={cfg.cross_attention_dim} but the captions are projected "
                f"to num_attention_heads x attention_head_dim = {inner}; set "
                f"{s}.cross_attention_dim={inner}"
            )
        if cfg.out_channels not in (cfg.in_channels, 2 * cfg.in_channels):
            raise ConfigError(
                f"{s}.out_channels={cfg.out_channels}: set it to in_channels ({cfg.in_channels}) "
                f"or, for a learned variance, 2 x in_channels ({2 * cfg.in_channels})"
            )
        if self.model.use_additional_conditions:
            raise ConfigError(
                f"{s}.use_additional_conditions is on (PixArt-alpha 1024 px style resolution "
                f"and aspect-ratio embeddings), which neither training nor {self.pipeline_class} "
                f"feeds; set {s}.use_additional_conditions=false"
            )
        if int(cfg.sample_size) % int(cfg.patch_size):
            raise ConfigError(f"{s}.sample_size={cfg.sample_size} is not a multiple of "
                              f"{s}.patch_size={cfg.patch_size}; change either")  # fmt: skip

    def _check_mask(self, conditioner: Any) -> None:
        encoder = getattr(conditioner, "model", None)
        config = getattr(encoder, "config", None)
        if config is not None and getattr(config, "use_attention_mask", True) is False:
            raise ConfigError(
                f"model.conditioner.use_attention_mask=false, but {self.pipeline_class} always "
                "passes the padding mask to the text encoder; set "
                "model.conditioner.use_attention_mask=true"
            )

    def pipeline_call_kwargs(self) -> dict[str, Any]:
        if self.max_sequence_length is None:
            raise RuntimeError("PixArtBackbone.check() has not run: no max_sequence_length")
        return sampling_kwargs(self.max_sequence_length)

    def wrap_units(self) -> set[type[nn.Module]]:
        from diffusers.models.attention import BasicTransformerBlock

        return {BasicTransformerBlock}
