"""SDXL's text conditioning: two frozen CLIP text encoders read the same prompt (Podell et al.
2023, 2.1). The backbone cross-attends to both encoders' penultimate hidden states side by side
and adds the second encoder's projected pooled embedding to its timestep embedding.

Built exactly as `StableDiffusionXLPipeline.encode_prompt` builds `prompt_embeds` and
`pooled_prompt_embeds`, so what the UNet sees in training is what it sees when sampled.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import CLIPTextModelWithProjection, PreTrainedModel, PreTrainedTokenizerBase

from train.errors import ConfigError
from train.models import adapters
from train.models.conditioners.text import ADAPTER_SETTING, adapter_grad, refuse_encoded
from train.models.conditioning import Conditioning

SETTING = "model.conditioner"


class SDXLTextEncoders(nn.Module):
    """CLIPTextModel + CLIPTextModelWithProjection with their tokenizers, frozen.

    The tokenizers are not named `tokenizer`: the data loader would then tokenize captions for
    one encoder only (`data.tokenizer` follows `model.conditioner.tokenizer`); this conditioner
    tokenizes the captions for both itself.
    """

    pooled_size: int

    def __init__(
        self,
        text_encoder_1: PreTrainedModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer_1: PreTrainedTokenizerBase,
        tokenizer_2: PreTrainedTokenizerBase,
        adapter: Any = None,
    ) -> None:
        """``adapter``: a peft config (``LoraConfig``) trained on both frozen encoders (kohya's
        and diffusers' SDXL LoRA scripts train both beside the UNet)."""
        super().__init__()
        check_encoders(text_encoder_1, text_encoder_2, tokenizer_1, tokenizer_2)
        self.text_encoder_1, self.text_encoder_2 = text_encoder_1, text_encoder_2
        self.tokenizer_1, self.tokenizer_2 = tokenizer_1, tokenizer_2
        self.requires_grad_(False)
        self.train(False)
        self.pooled_size = int(text_encoder_2.config.projection_dim)
        self.adapter = adapter
        if adapter is not None:
            for encoder in (text_encoder_1, text_encoder_2):
                adapters.attach(encoder, adapter, ADAPTER_SETTING)

    @property
    def hidden_size(self) -> int:
        """The width of `hidden`: both encoders' widths (768 + 1280 = 2048 for SDXL base)."""
        return int(self.text_encoder_1.config.hidden_size + self.text_encoder_2.config.hidden_size)

    @property
    def max_length(self) -> int:
        return int(self.tokenizer_1.model_max_length)

    def pipeline_parts(self) -> dict[str, object]:
        """The pipeline components this conditioner stands for (their names in diffusers)."""
        return {"text_encoder": self.text_encoder_1, "text_encoder_2": self.text_encoder_2,
                "tokenizer": self.tokenizer_1, "tokenizer_2": self.tokenizer_2}  # fmt: skip

    def encode(self, batch: dict, drop: torch.Tensor | None) -> Conditioning:
        """The batch's conditioning; rows with `drop` [B] get the empty prompt's. Precomputed
        embeddings (`ldm-data encode` shards: emb.npy and pooled.npy) when the batch has them."""
        if "encoder_hidden_states" in batch:
            refuse_encoded(self.adapter)
            if "pooled_embeds" not in batch:
                raise ValueError(
                    "these latent shards have no pooled.npy (encoded with a conditioner without "
                    f"a pooled embedding); encode them again with {SETTING}=sdxl or sdxl_tiny"
                )
            cond = Conditioning(batch["encoder_hidden_states"], pooled=batch["pooled_embeds"])
        else:
            cond = self.encode_prompts(list(batch["caption"]))
        return cond if drop is None else cond.where(drop, self.null())

    def null(self) -> Conditioning:
        """The empty prompt's conditioning [1, ...], computed once.

        Caption dropout trains the unconditional branch on the empty prompt's encoding, as
        diffusers' train_text_to_image_sdxl.py does (`proportion_empty_prompts` replaces
        captions with ""). Its pipeline's default `force_zeros_for_empty_prompt=True` would
        instead guide with all-zero embeddings (what SDXL base was trained with), so the UNet
        adapter ships SDXL pipelines with it set to False: sampling then encodes "" too.
        """
        if self.adapter is not None:  # the encoders train: their empty prompt moves too
            return self.encode_prompts([""])
        if getattr(self, "_null", None) is None:
            self._null = self.encode_prompts([""])
        return self._null

    def _apply(self, fn, recurse: bool = True):
        self._null = None  # computed again on the new device / dtype
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> SDXLTextEncoders:
        # Frozen: dropout stays off even when Lightning puts the LightningModule in train mode.
        return super().train(False)

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """`encode_prompt` without guidance: hidden [B, L, D1 + D2] (each encoder's
        penultimate layer), pooled [B, P] (the second encoder's `text_embeds`); with gradients
        for the adapter only when it trains."""
        with adapter_grad(self.adapter):
            return self._encode_prompts(prompts)

    def _encode_prompts(self, prompts: list[str]) -> Conditioning:
        hidden, out = [], None
        for tokenizer, encoder in ((self.tokenizer_1, self.text_encoder_1),
                                   (self.tokenizer_2, self.text_encoder_2)):  # fmt: skip
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids  # fmt: skip
            out = encoder(ids.to(encoder.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
        dtype = self.text_encoder_2.dtype  # the pipeline casts prompt_embeds to it
        return Conditioning(torch.cat(hidden, dim=-1).to(dtype), pooled=out.text_embeds)


def check_encoders(
    text_encoder_1: PreTrainedModel,
    text_encoder_2: PreTrainedModel,
    tokenizer_1: PreTrainedTokenizerBase,
    tokenizer_2: PreTrainedTokenizerBase,
) -> None:
    """ConfigError naming the setting when the parts cannot make SDXL's conditioning."""
    if not isinstance(text_encoder_2, CLIPTextModelWithProjection):
        raise ConfigError(
            f"{SETTING}.text_encoder_2 is a {type(text_encoder_2).__name__}, but SDXL's pooled "
            "embedding is the text_embeds of a transformers.CLIPTextModelWithProjection; use "
            f"that class for {SETTING}.text_encoder_2"
        )
    pairs = ((1, text_encoder_1, tokenizer_1), (2, text_encoder_2, tokenizer_2))
    lengths = {int(tok.model_max_length) for _, _, tok in pairs}
    if len(lengths) > 1:
        raise ConfigError(
            f"{SETTING}.tokenizer_1 and tokenizer_2 pad to {sorted(lengths)} tokens; their hidden "
            f"states are joined token by token, so set {SETTING}.tokenizer_2.model_max_length "
            f"to {int(tokenizer_1.model_max_length)}"
        )
    for i, encoder, tokenizer in pairs:
        cfg, ids = encoder.config, len(tokenizer)
        if ids > int(cfg.vocab_size):
            raise ConfigError(
                f"{SETTING}.tokenizer_{i} has {ids} token ids but {SETTING}.text_encoder_{i} "
                f"embeds {cfg.vocab_size}; set {SETTING}.text_encoder_{i}.config.vocab_size={ids}"
            )
        if int(tokenizer.model_max_length) > int(cfg.max_position_embeddings):
            raise ConfigError(
                f"{SETTING}.tokenizer_{i}.model_max_length={tokenizer.model_max_length} but "
                f"{SETTING}.text_encoder_{i} has {cfg.max_position_embeddings} positions; set "
                f"{SETTING}.tokenizer_{i}.model_max_length={cfg.max_position_embeddings}"
            )
