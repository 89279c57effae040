"""SD3's three text towers (Esser et al. 2024, 2.3): CLIP-L and CLIP-G, both with projection,
and T5, combined exactly as `StableDiffusion3Pipeline.encode_prompt` combines them.

hidden [B, 77 + max_sequence_length, W]: the two CLIPs' penultimate states side by side,
zero-padded to the joint width W, then T5's states; pooled [B, P_L + P_G]: both projections.
Without T5 (`text_encoder_3=None`) the pipeline puts zeros [B, max_sequence_length, W] in T5's
place, W the transformer's joint_attention_dim, so training does the same.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from train.errors import ConfigError
from train.models.conditioners.towers import (
    FrozenTowers,
    clip_penultimate_and_projection,
    device_of,
    require_projection,
    require_vocab,
    t5_states,
    token_ids,
    width_of,
)
from train.models.conditioning import Conditioning

SETTING = "model.conditioner"
MAX_T5_LENGTH = 512  # StableDiffusion3Pipeline.check_inputs refuses more


class SD3TextEncoders(FrozenTowers):
    """CLIP-L + CLIP-G (+ T5) as the SD3 pipeline encodes prompts; attribute names are the
    pipeline's component names."""

    def __init__(
        self,
        text_encoder: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        text_encoder_2: PreTrainedModel,
        tokenizer_2: PreTrainedTokenizerBase,
        text_encoder_3: PreTrainedModel | None = None,
        tokenizer_3: PreTrainedTokenizerBase | None = None,
        max_sequence_length: int = 256,
        joint_attention_dim: int | None = None,
        adapter: Any = None,
    ) -> None:
        """``adapter``: a peft config (``LoraConfig``) trained on both CLIP encoders."""
        super().__init__()
        for name, model in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
            require_projection(model, f"{SETTING}.{name}", True, "StableDiffusion3Pipeline")
        pairs = (("text_encoder", text_encoder, tokenizer),
                 ("text_encoder_2", text_encoder_2, tokenizer_2),
                 ("text_encoder_3", text_encoder_3, tokenizer_3))  # fmt: skip
        for name, model, tok in pairs:
            if model is not None and tok is not None:
                require_vocab(model, tok, f"{SETTING}.{name}")
        if (text_encoder_3 is None) != (tokenizer_3 is None):
            raise ConfigError(f"{SETTING}.text_encoder_3 and {SETTING}.tokenizer_3 go together: "
                              "set both, or both to null (CLIP only)")  # fmt: skip
        if not 1 <= max_sequence_length <= MAX_T5_LENGTH:
            raise ConfigError(f"{SETTING}.max_sequence_length={max_sequence_length}: the SD3 "
                              f"pipeline takes 1..{MAX_T5_LENGTH} T5 tokens")  # fmt: skip
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.text_encoder_3, self.tokenizer_3 = text_encoder_3, tokenizer_3
        self.max_sequence_length = max_sequence_length
        if tokenizer_3 is not None:
            # Recorded where the export keeps it: ldm-sample passes it to the pipeline.
            tokenizer_3.model_max_length = max_sequence_length
        self.hidden_size = self._width(joint_attention_dim)
        self.pooled_size = int(text_encoder.config.projection_dim) + int(
            text_encoder_2.config.projection_dim
        )
        self.freeze(adapter)

    def _width(self, joint_attention_dim: int | None) -> int:
        """The joint width W: T5's, or (without T5) the transformer's, given here."""
        if self.text_encoder_3 is not None:
            width = width_of(self.text_encoder_3)
            if joint_attention_dim not in (None, width):
                raise ConfigError(
                    f"{SETTING}.joint_attention_dim={joint_attention_dim} but T5's width is "
                    f"{width}; set {SETTING}.joint_attention_dim=null (it is T5's)"
                )
        elif joint_attention_dim is None:
            raise ConfigError(
                f"{SETTING}.text_encoder_3=null (CLIP only) needs {SETTING}.joint_attention_dim:"
                " set it to the transformer's joint_attention_dim (the zeros that stand in for "
                "T5 have that width)"
            )
        else:
            width = joint_attention_dim
        clip = width_of(self.text_encoder) + width_of(self.text_encoder_2)
        if clip > width:
            # F.pad with a negative width would silently cut the CLIP states.
            raise ConfigError(
                f"the CLIP-L + CLIP-G hidden sizes ({clip}) exceed the joint width {width}: use "
                f"a T5 (or {SETTING}.joint_attention_dim) at least {clip} wide"
            )
        return width

    @property
    def max_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    def pipeline_parts(self) -> dict[str, object]:
        return {"text_encoder": self.text_encoder, "tokenizer": self.tokenizer,
                "text_encoder_2": self.text_encoder_2, "tokenizer_2": self.tokenizer_2,
                "text_encoder_3": self.text_encoder_3,
                "tokenizer_3": self.tokenizer_3}  # fmt: skip

    def pipeline_call_kwargs(self) -> dict[str, object]:
        """What a pipeline call needs to encode prompts as training did."""
        return {"max_sequence_length": self.max_sequence_length}

    def embed(self, prompts: list[str]) -> Conditioning:
        """== StableDiffusion3Pipeline.encode_prompt(prompts, max_sequence_length=...)."""
        # Both CLIPs are padded to the first tokenizer's length, as the pipeline pads them.
        length = self.max_length
        states, pooled = [], []
        for model, tok in ((self.text_encoder, self.tokenizer),
                           (self.text_encoder_2, self.tokenizer_2)):  # fmt: skip
            h, p = clip_penultimate_and_projection(model, token_ids(tok, prompts, length, model))
            states.append(h.to(self.text_encoder.dtype))
            pooled.append(p)
        if self.text_encoder_3 is None:
            t5 = torch.zeros(len(prompts), self.max_sequence_length, self.hidden_size,
                             device=device_of(self.text_encoder),
                             dtype=self.text_encoder.dtype)  # fmt: skip
        else:
            ids = token_ids(self.tokenizer_3, prompts, self.max_sequence_length,
                            self.text_encoder_3)  # fmt: skip
            t5 = t5_states(self.text_encoder_3, ids)
        clip = torch.cat(states, dim=-1)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return Conditioning(torch.cat([clip, t5], dim=-2), pooled=torch.cat(pooled, dim=-1))
