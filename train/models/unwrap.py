"""A model's own class under the wrappers that distributed training swaps in."""

from __future__ import annotations

from torch import nn


def model_class(model: nn.Module) -> type[nn.Module]:
    """The model's own class: FSDP2's ``fully_shard`` swaps in a subclass ``FSDP<Name>`` that
    a plain copy, a FLOP count or an export must not take."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(model)
    if issubclass(cls, FSDPModule):
        return next(b for b in cls.__bases__ if not issubclass(b, FSDPModule))
    return cls
