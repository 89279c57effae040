"""Flux's two text towers: CLIP-L for the pooled embedding (its `pooler_output`, unprojected) and
T5 for the token states, exactly as `FluxPipeline.encode_prompt` runs them."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from train.errors import ConfigError
from train.models.conditioners.towers import (
    FrozenTowers,
    clip_pooler,
    require_projection,
    require_vocab,
    t5_states,
    token_ids,
    width_of,
)
from train.models.conditioning import Conditioning

SETTING = "model.conditioner"
MAX_T5_LENGTH = 512  # FluxPipeline.check_inputs refuses more


class FluxTextEncoders(FrozenTowers):
    """hidden [B, max_sequence_length, T5 width] and pooled [B, CLIP width]; attribute names
    are FluxPipeline's component names."""

    def __init__(
        self,
        text_encoder: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        text_encoder_2: PreTrainedModel,
        tokenizer_2: PreTrainedTokenizerBase,
        max_sequence_length: int = 512,
        adapter: Any = None,
    ) -> None:
        """``adapter``: a peft config (``LoraConfig``) trained on the CLIP encoder."""
        super().__init__()
        require_projection(text_encoder, f"{SETTING}.text_encoder", False, "FluxPipeline")
        require_vocab(text_encoder, tokenizer, f"{SETTING}.text_encoder")
        require_vocab(text_encoder_2, tokenizer_2, f"{SETTING}.text_encoder_2")
        if not 1 <= max_sequence_length <= MAX_T5_LENGTH:
            raise ConfigError(f"{SETTING}.max_sequence_length={max_sequence_length}: FluxPipeline "
                              f"takes 1..{MAX_T5_LENGTH} T5 tokens")  # fmt: skip
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.max_sequence_length = max_sequence_length
        # Recorded where the export keeps it: ldm-sample passes it to the pipeline.
        tokenizer_2.model_max_length = max_sequence_length
        self.hidden_size = width_of(text_encoder_2)
        self.pooled_size = width_of(text_encoder)
        self.freeze(adapter)

    @property
    def max_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    def pipeline_parts(self) -> dict[str, object]:
        return {"text_encoder": self.text_encoder, "tokenizer": self.tokenizer,
                "text_encoder_2": self.text_encoder_2,
                "tokenizer_2": self.tokenizer_2}  # fmt: skip

    def pipeline_call_kwargs(self) -> dict[str, object]:
        """What a pipeline call needs to encode prompts as training did."""
        return {"max_sequence_length": self.max_sequence_length}

    def embed(self, prompts: list[str]) -> Conditioning:
        """== FluxPipeline.encode_prompt(prompts, max_sequence_length=...)[:2]."""
        ids = token_ids(self.tokenizer, prompts, self.max_length, self.text_encoder)
        pooled = clip_pooler(self.text_encoder, ids).to(self.text_encoder.dtype)
        ids = token_ids(self.tokenizer_2, prompts, self.max_sequence_length, self.text_encoder_2)
        return Conditioning(t5_states(self.text_encoder_2, ids), pooled=pooled)
