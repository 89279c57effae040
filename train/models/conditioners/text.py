"""One frozen text encoder + tokenizer as a conditioner, used as diffusers' pipelines use it
(SD 1.x/2.x, PixArt, and the demo's MiniLM)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from train.config.resolvers import minilm_dir  # noqa: F401 - re-exported: callers import it from here
from train.errors import ConfigError
from train.models import adapters
from train.models.conditioning import Conditioning

ADAPTER_SETTING = "model.conditioner.adapter"


class FrozenTextEncoder(nn.Module):
    """Encoder + tokenizer whose output matches `StableDiffusionPipeline.encode_prompt`.

    The pipeline pads every prompt to `tokenizer.model_max_length` and passes the attention mask
    only when `text_encoder.config.use_attention_mask` is true, so training does exactly the same
    and records the choice in the encoder's config, which travels with the export.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        use_attention_mask: bool | None = False,
        cache_size: int = 0,
        adapter: Any = None,
    ) -> None:
        """``use_attention_mask=None`` keeps the loaded encoder's own setting (a pipeline's text
        encoder exported with it), else False. ``adapter``: a peft config (``LoraConfig``) that
        trains on the frozen encoder (a text-encoder LoRA, as kohya's and diffusers' LoRA
        scripts train beside the UNet's)."""
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        if use_attention_mask is None:
            use_attention_mask = bool(getattr(model.config, "use_attention_mask", False))
        self.model.config.use_attention_mask = use_attention_mask
        self.model.requires_grad_(False)
        self.model.eval()
        self.adapter = adapter
        if adapter is not None:
            if cache_size:
                raise ConfigError(
                    f"model.conditioner.cache_size={cache_size} caches the encoder's outputs, but "
                    f"{ADAPTER_SETTING} trains the encoder, so they change every step; set "
                    "model.conditioner.cache_size=0"
                )
            adapters.attach(model, adapter, ADAPTER_SETTING)
        # A frozen encoder's output is a pure function of the token ids: with few distinct
        # captions (small or synthetic sets) caching skips most encoder passes.
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, bytes], torch.Tensor] = OrderedDict()

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def max_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    # No pooled embedding: a single encoder's hidden states condition the backbone.
    pooled_size: int | None = None

    def pipeline_parts(self) -> dict[str, object]:
        """The pipeline components this conditioner stands for."""
        return {"text_encoder": self.model, "tokenizer": self.tokenizer}

    def encode(self, batch: dict, drop: torch.Tensor | None) -> Conditioning:
        """The batch's conditioning; rows with `drop` [B] get the empty prompt's. Precomputed
        hidden states (`ldm-data encode` shards) when the batch has them, else the captions'
        tokens (tokenized in the loader workers, or here)."""
        if "encoder_hidden_states" in batch:
            refuse_encoded(self.adapter)
            cond = Conditioning(
                batch["encoder_hidden_states"], mask=batch.get("encoder_attention_mask")
            )
            return cond if drop is None else cond.where(drop, self.null())
        if "input_ids" not in batch:
            batch = {**batch, **self.tokenize(list(batch["caption"]))}
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if drop is not None:
            empty = {k: v.to(ids.device) for k, v in self.tokenize([""]).items()}
            ids = torch.where(drop[:, None], empty["input_ids"].expand_as(ids), ids)
            mask = torch.where(drop[:, None], empty["attention_mask"].expand_as(mask), mask)
        return Conditioning(self(ids, mask), mask=mask)

    def _apply(self, fn, recurse: bool = True):
        self._null = None  # computed again on the new device / dtype
        return super()._apply(fn, recurse)

    def null(self) -> Conditioning:
        """The empty prompt's conditioning [1, ...], computed once (each time for an encoder
        whose adapter trains)."""
        if getattr(self, "_null", None) is None or self.adapter is not None:
            empty = self.tokenize([""])
            device = next(self.model.parameters()).device
            ids, mask = empty["input_ids"].to(device), empty["attention_mask"].to(device)
            self._null = Conditioning(self(ids, mask), mask=mask)
        return self._null

    def train(self, mode: bool = True) -> FrozenTextEncoder:
        # Frozen: dropout stays off even when Lightning puts the LightningModule in train mode.
        super().train(False)
        return self

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(
            captions,
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Token ids [B, L] -> hidden states [B, L, D] (the pipeline's `prompt_embeds`); with
        gradients for the adapter only when it trains."""
        with adapter_grad(self.adapter):
            return self._encode(input_ids, attention_mask)

    def _encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        mask = attention_mask if self.model.config.use_attention_mask else None
        if self.cache_size <= 0:
            return self.model(input_ids, attention_mask=mask)[0]
        keys = [(str(row.device), row.cpu().numpy().tobytes()) for row in input_ids]
        missing = sorted({i for i, k in enumerate(keys) if k not in self._cache})
        if missing:
            idx = torch.tensor(missing, device=input_ids.device)
            sub_mask = mask[idx] if mask is not None else None
            hidden = self.model(input_ids[idx], attention_mask=sub_mask)[0]
            for i, h in zip(missing, hidden, strict=True):
                self._cache[keys[i]] = h
        for k in keys:
            self._cache.move_to_end(k)
        out = torch.stack([self._cache[k] for k in keys])
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return out


def adapter_grad(adapter: Any) -> torch.set_grad_enabled:
    """A context that keeps gradients on (where they are) only for an encoder whose adapter
    trains; a frozen encoder runs without them."""
    return torch.set_grad_enabled(adapter is not None and torch.is_grad_enabled())


def refuse_encoded(adapter: Any) -> None:
    """ConfigError for precomputed encoder outputs when the encoder's adapter trains."""
    if adapter is not None:
        raise ConfigError(
            f"{ADAPTER_SETTING} trains the text encoder, but the shards hold its outputs "
            "(encoder_hidden_states, written by ldm-data encode); train on shards with "
            "captions, or without the text-encoder adapter"
        )


def long_prompts_note(tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> str | None:
    """One short line about the prompts longer than the text encoder reads, or None."""
    limit = int(tokenizer.model_max_length)
    # verbose=False: not the tokenizer's own warning, which this line replaces.
    lengths = [len(ids) for ids in tokenizer(prompts, verbose=False)["input_ids"]]
    long = [(i, n) for i, n in enumerate(lengths, 1) if n > limit]
    if not long:
        return None
    which = ", ".join(str(i) for i, _ in long)
    sizes = ", ".join(str(n) for _, n in long)
    are = "is" if len(long) == 1 else "are"
    return (
        f"prompt{'s' * (len(long) > 1)} {which} {are} {sizes} tokens; the text encoder reads "
        f"the first {limit} (model.conditioner.tokenizer.model_max_length at training)"
    )
