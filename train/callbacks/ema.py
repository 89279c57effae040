"""EMA of the UNet's weights, kept in float32 next to whatever shards this rank holds (and of a
text encoder's adapter, when one trains).

diffusers' EMAModel and Lightning's WeightAveraging keep a whole copy of each parameter, which
under ZeRO-3 and FSDP is an empty placeholder or a flat slice: they would average nothing or
the wrong thing. This callback averages exactly the tensors this rank owns (`local_tensors`), so
under sharding the EMA is sharded the same way and costs 4 bytes per owned parameter. Whole EMA
weights are gathered only for exports, previews and (FSDP) checkpoints, by copying the EMA into
the live shards for the length of one collective gather.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import lightning as L
import torch

from train.distributed.sharding import (
    StateDict,
    clean_name,
    full_state_dict,
    gather_fsdp_shards,
    gather_zero3_shards,
    is_fsdp,
    is_fsdp2,
    is_sharded,
    is_zero3,
    local_tensors,
    submodule_prefix,
    zero3_partition,
    zero3_unpartition,
)
from train.models.adapters import has_adapter


class EMA(L.Callback):
    """Exponential moving average of the trainable model's parameters, updated after every
    optimizer step; exports and previews use it instead of the raw weights.

    The decay ramps up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates (diffusers'
    EMAModel default), so early averages are not dominated by the random initialisation.
    """

    def __init__(self, decay: float = 0.9999, update_every: int = 1) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"callbacks.ema.decay={decay}: must be in [0, 1)")
        self.decay, self.update_every = decay, update_every
        self.updates = 0
        self.shadow: list[torch.Tensor] | None = None
        # A text-encoder adapter's EMA: whole tensors (such adapters train under DDP and
        # ZeRO-1/2 only, which keep every parameter whole on every rank).
        self.text_shadow: list[torch.Tensor] = []
        self._pending: dict | None = None
        self._last_step = -1

    def current_decay(self) -> float:
        n = self.updates
        return min(self.decay, (1 + n) / (10 + n))

    def _params(self, pl_module: L.LightningModule) -> list[torch.nn.Parameter]:
        # The parameters that train: all of them, or an adapter's (its frozen base never moves,
        # so a shadow of it would only cost memory and checkpoint space).
        return trainable_params(pl_module)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step
        if self.shadow is not None:
            return
        local = local_tensors(trainer.strategy, self._params(pl_module))
        text = text_params(pl_module)
        if self._pending is None:
            self.shadow = [t.detach().float().clone() for t in local]
            self.text_shadow = [t.detach().float().clone() for t in text]
        else:
            self.shadow = restore_shadow(trainer, pl_module, self._pending, local)
            self.text_shadow = restore_text_shadow(pl_module, self._pending, text)
            self._pending = None

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._last_step:  # accumulating: no optimizer step yet
            return
        self._last_step = trainer.global_step
        if trainer.global_step % self.update_every:
            return
        decay = self.current_decay()
        local = local_tensors(trainer.strategy, self._params(pl_module))
        for ema, live in zip(self.shadow, local, strict=True):
            ema.lerp_(live.float(), 1.0 - decay)
        for ema, live in zip(self.text_shadow, text_params(pl_module), strict=True):
            ema.lerp_(live.float(), 1.0 - decay)
        self.updates += 1

    @contextlib.contextmanager
    def text_weights(self, pl_module: L.LightningModule) -> Iterator[None]:
        """The text encoder's adapter holds its EMA weights inside (no-op without one)."""
        live = text_params(pl_module)
        if not live or not self.text_shadow:
            yield
            return
        with swapped_in(live, self.text_shadow):
            yield

    def full_model_state(
        self, trainer: L.Trainer, pl_module: L.LightningModule
    ) -> StateDict | None:
        """Collective: the trainable model's state with EMA parameters, on global rank 0 (None
        elsewhere)."""
        if is_zero3(trainer.strategy):
            # Small parameters stay whole on every rank under ZeRO-3 (persistence threshold),
            # so gathering live parameters would miss EMA values swapped into the partitions.
            return gather_zero3_shards(trainer, pl_module.trainable, self.shadow)
        if is_sharded(trainer.strategy) and not is_fsdp2(trainer.strategy):  # FSDP's flat shards
            return gather_fsdp_shards(trainer, pl_module.trainable, self.shadow)
        local = local_tensors(trainer.strategy, self._params(pl_module))
        with swapped_in(local, self.shadow):
            return full_state_dict(trainer, pl_module.trainable)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict:
        # Lightning asks every rank (trainer.save_checkpoint runs on all), so gathering is safe.
        trainer = self._trainer
        saved = shadow_for_checkpoint(trainer, trainer.lightning_module, self)
        return {"decay": self.decay, "updates": self.updates, **saved}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])
        self._pending = state
        self.shadow = None


def trainable_params(pl_module) -> list[torch.nn.Parameter]:
    return [p for p in pl_module.trainable.parameters() if p.requires_grad]


def text_params(pl_module) -> list[torch.nn.Parameter]:
    """The parameters of a text encoder's adapter (`trained_conditioner`), or none."""
    conditioner = getattr(pl_module, "trained_conditioner", None)
    return [] if conditioner is None else [p for p in conditioner.parameters() if p.requires_grad]


def text_names(pl_module) -> list[str]:
    """Names of `text_params` in the same order, as keys under ``trained_conditioner.``."""
    conditioner = getattr(pl_module, "trained_conditioner", None)
    if conditioner is None:
        return []
    return [clean_name(n) for n, p in conditioner.named_parameters() if p.requires_grad]


def trainable_names(pl_module) -> list[str]:
    """Names of `trainable_params`, in the same order, as state-dict keys."""
    return [clean_name(n) for n, p in pl_module.trainable.named_parameters() if p.requires_grad]


def shadow_for_checkpoint(trainer: L.Trainer, pl_module, ema: EMA) -> dict:
    """What a checkpoint stores: each rank's flat shards under ZeRO-3 (DeepSpeed writes every
    rank's callback state), else the whole EMA state dict (written by rank 0); for an adapter
    run only the adapter's entries (the base is loaded from model.base again)."""
    if ema.shadow is None:
        return {}
    if is_zero3(trainer.strategy):
        names = trainable_names(pl_module)
        shapes = [list(p.ds_shape) for p in trainable_params(pl_module)]
        return {
            "layout": "zero3",
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "names": names,
            "shapes": shapes,
            "shards": [t.cpu() for t in ema.shadow],
        }
    state = ema.full_model_state(trainer, pl_module)
    if not trainer.is_global_zero:
        return {}
    if has_adapter(pl_module.trainable):
        keep = set(trainable_names(pl_module))
        state = {k: v for k, v in state.items() if k in keep}
    text = {n: t.cpu() for n, t in zip(text_names(pl_module), ema.text_shadow, strict=True)}
    return {"layout": "full", "state": state, **({"text_state": text} if text else {})}


def restore_text_shadow(pl_module, saved: dict, live: list[torch.Tensor]) -> list[torch.Tensor]:
    """The text adapter's EMA from a checkpoint's EMA state; the live weights when the saved run
    had no text adapter (one added on resume starts its average there)."""
    text = saved.get("text_state")
    if text is None:
        return [t.detach().float().clone() for t in live]
    names = text_names(pl_module)
    if set(names) != set(text):
        raise ValueError("the checkpoint's text-encoder EMA does not match the text encoder's "
                         f"adapter (e.g. {sorted(set(names) ^ set(text))[:3]}); resume with the "
                         "run's model.conditioner.adapter")  # fmt: skip
    return [text[n].to(t.device, torch.float32) for n, t in zip(names, live, strict=True)]


def restore_shadow(trainer: L.Trainer, pl_module, saved: dict, local) -> list[torch.Tensor]:
    """This rank's EMA tensors from a checkpoint's EMA state (see `shadow_for_checkpoint`)."""
    names = trainable_names(pl_module)
    if saved.get("layout") == "zero3":
        if not is_zero3(trainer.strategy) or saved["world_size"] != trainer.world_size:
            raise ValueError(
                f"the checkpoint's EMA is sharded over {saved['world_size']} ZeRO-3 ranks; resume "
                "it with the same strategy and world size, or export it with ldm-export"
            )
        shards = saved["shards"]
        return [s.to(t.device, torch.float32) for s, t in zip(shards, local, strict=True)]
    full = saved.get("state")
    if full is None:
        raise ValueError("the checkpoint's EMA state is empty: it was saved before any update")
    whole = {n: full[n] for n in names}  # in parameter order, aligned with `local`
    return [s.float() for s in shard_like(trainer, whole, local)]


def shard_like(trainer: L.Trainer, whole: StateDict, local: list[torch.Tensor]) -> list:
    """Cut whole UNet tensors (by parameter name, in parameter order) the way this rank's
    ``local`` tensors are cut."""
    if is_zero3(trainer.strategy):
        rank = trainer.global_rank
        return [
            zero3_partition(w, rank, t.numel()).to(t.device)
            for w, t in zip(whole.values(), local, strict=True)
        ]
    if not is_fsdp(trainer.strategy):
        return [w.to(t.device) for w, t in zip(whole.values(), local, strict=True)]
    # FSDP's flat-parameter layout is private (FSDP2's: dim 0, padded); let FSDP cut the whole
    # tensors into the live shards, read them out, and put the trained weights back.
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    pl_module = trainer.lightning_module
    prefix = clean_name(submodule_prefix(pl_module, pl_module.trainable))
    with preserved(local):
        full = {f"{prefix}{n}": w for n, w in whole.items()}
        options = StateDictOptions(full_state_dict=True, strict=False)
        result = set_model_state_dict(trainer.strategy.model, full, options=options)
        if result.unexpected_keys:  # strict=False must not mean "loaded nothing"
            raise ValueError(f"EMA keys not in the model: {sorted(result.unexpected_keys)[:5]}")
        return [t.detach().clone() for t in local]


def ema_from_checkpoint(ckpt: dict) -> StateDict | None:
    """The whole EMA UNet state stored in a checkpoint (from `load_any_checkpoint`), or None
    when the run had no EMA. ZeRO-3 checkpoints hold one shard per rank's state file."""
    saved = _ema_state(ckpt.get("callbacks", {}))
    if not saved or "layout" not in saved:
        return None
    if saved["layout"] == "full":
        return saved["state"]
    per_rank = [_ema_state(c) for c in ckpt.get("rank_callbacks", [])]
    if len(per_rank) != saved["world_size"] or any(not r for r in per_rank):
        raise ValueError(
            f"the checkpoint's EMA is sharded over {saved['world_size']} ranks but "
            f"{len(per_rank)} rank state files hold it; is the checkpoint folder complete?"
        )
    per_rank.sort(key=lambda r: r["rank"])
    return {
        name: zero3_unpartition([r["shards"][i] for r in per_rank], shape)
        for i, (name, shape) in enumerate(zip(saved["names"], saved["shapes"], strict=True))
    }


def text_ema_from_checkpoint(ckpt: dict) -> StateDict | None:
    """The EMA of a text encoder's adapter in a checkpoint (names under `trained_conditioner`),
    or None when the run had no EMA or no text adapter."""
    saved = _ema_state(ckpt.get("callbacks", {}))
    return (saved or {}).get("text_state")


def _ema_state(callbacks: dict) -> dict | None:
    return next((v for k, v in callbacks.items() if k == EMA.__qualname__), None)


@contextlib.contextmanager
def preserved(live: list[torch.Tensor]) -> Iterator[None]:
    """Whatever happens to the ``live`` tensors inside, their values are restored after."""
    backup = [t.detach().clone() for t in live]
    try:
        yield
    finally:
        with torch.no_grad():
            for t, b in zip(live, backup, strict=True):
                t.copy_(b)


@contextlib.contextmanager
def swapped_in(live: list[torch.Tensor], values: list[torch.Tensor]) -> Iterator[None]:
    """Temporarily copy ``values`` into the ``live`` tensors (restored afterwards, always)."""
    with preserved(live):
        with torch.no_grad():
            for t, v in zip(live, values, strict=True):
                t.copy_(v)
        yield
