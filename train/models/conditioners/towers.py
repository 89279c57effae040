"""CLIP and T5 text towers run as diffusers' SD3 and Flux pipelines run them, and the frozen base
of conditioners that hold several towers and tokenize captions themselves.

Each function here is one line of a pipeline's `encode_prompt` (the names say which), kept in one
place so the families that share a tower share its exact call.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from train.errors import ConfigError
from train.models import adapters
from train.models.conditioners.text import ADAPTER_SETTING, adapter_grad, refuse_encoded
from train.models.conditioning import Conditioning


def token_ids(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_length: int, like: nn.Module
) -> torch.Tensor:
    """Ids [B, max_length] padded and cut as the pipelines do, on `like`'s device."""
    ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="pt").input_ids  # fmt: skip
    return ids.to(device_of(like))


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def clip_penultimate_and_projection(
    model: PreTrainedModel, ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3's CLIP call: the penultimate layer's states [B, L, D] and the projected pooled
    embedding [B, P] (`output[0]` of a CLIPTextModelWithProjection)."""
    out = model(ids, output_hidden_states=True)
    return out.hidden_states[-2], out[0]


def clip_pooler(model: PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    """Flux's CLIP call: the unprojected pooled output [B, D] (the EOS token's final state)."""
    return model(ids, output_hidden_states=False).pooler_output


def t5_states(model: PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    """SD3's and Flux's T5 call: the last states [B, L, D], without an attention mask (both
    pipelines attend to the padding, so training does too)."""
    return model(ids, output_hidden_states=False)[0]


def width_of(model: PreTrainedModel) -> int:
    """Hidden width of a text model (T5 calls it d_model)."""
    cfg = model.config
    return int(getattr(cfg, "d_model", None) or cfg.hidden_size)


def require_vocab(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, setting: str) -> None:
    """ConfigError when the tokenizer has ids the model cannot embed (an index error at the
    first batch otherwise)."""
    ids, vocab = len(tokenizer), int(model.config.vocab_size)
    if ids > vocab:
        raise ConfigError(
            f"{setting}'s tokenizer has {ids} ids but the model embeds {vocab}; set "
            f"{setting}.config.vocab_size={ids} (or pair the model with its own tokenizer)"
        )


def require_projection(model: PreTrainedModel, setting: str, wanted: bool, pipeline: str) -> None:
    """ConfigError unless the CLIP class pools the way `pipeline` reads it: with the projection
    (`text_embeds`, SD3) or without (`pooler_output`, Flux)."""
    has = hasattr(model, "text_projection")
    if has != wanted:
        cls = "CLIPTextModelWithProjection" if wanted else "CLIPTextModel"
        raise ConfigError(
            f"{setting} is a {type(model).__name__} but {pipeline} reads the "
            f"{'projected' if wanted else 'unprojected'} pooled embedding; set "
            f"{setting}._target_=transformers.{cls} (or {cls}.from_pretrained)"
        )


# The T5 tokenizer of every SD3 / Flux pipeline (text-to-image, ControlNet, img2img), by class-name
# prefix: its model_max_length is the T5 length trained with.
T5_TOKENIZERS = {"StableDiffusion3": "tokenizer_3", "Flux": "tokenizer_2"}


def sampling_kwargs(pipe: object) -> dict[str, int]:
    """max_sequence_length for a loaded SD3 / Flux export ({} for other pipelines, and for SD3
    without T5, whose zeros then take the pipeline's default length, 256)."""
    name = type(pipe).__name__
    attr = next((t for prefix, t in T5_TOKENIZERS.items() if name.startswith(prefix)), "")
    tokenizer = getattr(pipe, attr, None) if attr else None
    return {} if tokenizer is None else {"max_sequence_length": int(tokenizer.model_max_length)}


class FrozenTowers(nn.Module):
    """Frozen text towers that tokenize captions themselves (their several tokenizers leave the
    data loader none to run). Subclasses define `embed(prompts) -> Conditioning`."""

    hidden_size: int
    pooled_size: int | None
    max_length: int
    adapter: Any = None

    def freeze(self, adapter: Any = None) -> None:
        """Freeze every tower; ``adapter`` (a peft config) goes on each tower that has modules
        its targets name: CLIP's attention (`adapter=lora`, the towers diffusers' SD3 and Flux
        LoRA scripts train), T5's (`adapter=lora_t5`), or both when it names both."""
        self.requires_grad_(False)
        super().train(False)
        self.adapter = adapter
        if adapter is None:
            return
        towers = [p for p in self.pipeline_parts().values() if isinstance(p, torch.nn.Module)]
        named = [p for p in towers if adapters.targets_in(p, adapter)]
        if not named:  # attach's error names the first tower's adaptable layers
            adapters.attach(towers[0], adapter, ADAPTER_SETTING)
        for part in named:
            adapters.attach(part, adapter, ADAPTER_SETTING)

    def embed(self, prompts: list[str]) -> Conditioning:
        raise NotImplementedError

    def encode(self, batch: dict, drop: torch.Tensor | None) -> Conditioning:
        """The batch's conditioning; rows with `drop` [B] get the empty prompt's. Precomputed
        embeddings (`ldm-data encode` shards) when the batch has them, else its captions'."""
        if "encoder_hidden_states" in batch:
            refuse_encoded(self.adapter)
            cond = Conditioning(batch["encoder_hidden_states"], pooled=batch.get("pooled_embeds"))
        else:
            with adapter_grad(self.adapter):
                cond = self.embed(list(batch["caption"]))
        return cond if drop is None else cond.where(drop, self.null())

    def null(self) -> Conditioning:
        """The empty prompt's conditioning [1, ...] (the pipelines' negative prompt), once (each
        time while an adapter trains the towers)."""
        if self.adapter is not None:
            with adapter_grad(self.adapter):
                return self.embed([""])
        if getattr(self, "_null", None) is None:
            with torch.no_grad():
                self._null = self.embed([""])
        return self._null

    def _apply(self, fn, recurse: bool = True):
        self._null = None  # computed again on the new device / dtype
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> FrozenTowers:
        # Frozen: dropout stays off even when Lightning puts the LightningModule in train mode.
        super().train(False)
        return self
