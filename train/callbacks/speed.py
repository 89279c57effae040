"""Speed switches for the trained model: `torch.compile` per block and channels_last memory.

Applied in `setup`, before the strategy wraps the model (DDP, FSDP units, DeepSpeed), and in
place: each block's forward is compiled with `nn.Module.compile` (as torchtitan compiles its
transformer blocks), so parameter names, FSDP units, checkpoints, EMA and exports see the same
modules as without it, and compile time grows with the number of distinct block shapes, not
with the whole graph. channels_last (NHWC) is the layout cuDNN's and oneDNN's fastest
convolutions read; it changes strides, not values or state-dict keys. Whatever the switches,
the run logs which attention its model runs (`attention_report`): diffusers' processors and
the kernel PyTorch's SDPA picks for the model's head size and the training dtype.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn

log = logging.getLogger(__name__)


class SpeedSwitches(L.Callback):
    """``compile_blocks``: compile each of the backbone's blocks (its FSDP units,
    ``backbone.wrap_units()``) with ``compile_options`` (``torch.compile`` keyword arguments,
    e.g. ``{"mode": "max-autotune-no-cudagraphs"}``); ``channels_last``: a UNet's weights, and
    so its convolutions, in NHWC."""

    def __init__(
        self,
        compile_blocks: bool = False,
        channels_last: bool = False,
        compile_options: dict[str, Any] | None = None,
    ) -> None:
        self.compile_blocks = compile_blocks
        self.channels_last = channels_last
        self.compile_options = dict(compile_options or {})
        self.compiled = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        backbone = getattr(pl_module, "backbone", None)
        if stage != "fit" or backbone is None:
            return
        dtype = compute_dtype(str(trainer.precision))
        rank_zero_info(attention_report(backbone.model, trainer.strategy.root_device, dtype))
        if self.channels_last:
            to_channels_last(backbone.model)
        if self.compile_blocks:
            self.compiled = compile_blocks(backbone.model, backbone.wrap_units(),
                                           self.compile_options)  # fmt: skip
            log.info(f"torch.compile: {self.compiled} blocks of {type(backbone.model).__name__}")


def to_channels_last(model: nn.Module) -> None:
    """4-D weights (convolutions) in channels_last; the rest keep their layout."""
    for p in model.parameters():
        if p.dim() == 4:
            p.data = p.data.contiguous(memory_format=torch.channels_last)


def compile_blocks(model: nn.Module, units: set[type[nn.Module]], options: dict[str, Any]) -> int:
    """Compile every module of a type in `units` in place (outermost ones only: a block inside
    a compiled block is traced with it); returns how many were compiled."""
    kinds = tuple(units)
    if not kinds:
        raise ValueError(f"{type(model).__name__} names no blocks to compile (wrap_units)")
    done = [m for m in model.modules() if isinstance(m, kinds)]
    done = [m for m in done if not any(o is not m and _contains(o, m) for o in done)]
    # Blocks of one class share their forward's code; each shape (a UNet's blocks differ in
    # width and resolution) is compiled once, static, as the shapes of a training run are fixed
    # (dynamic shapes fail in Inductor for some diffusers blocks), so allow one per block.
    import torch._dynamo.config as dynamo

    dynamo.recompile_limit = max(dynamo.recompile_limit, len(done))
    dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, 4 * len(done))
    for module in done:
        module.compile(**{"dynamic": False, **options})
    return len(done)


def _contains(outer: nn.Module, inner: nn.Module) -> bool:
    return any(m is inner for m in outer.modules())


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype attention computes in under a Trainer ``precision`` setting."""
    if precision.startswith("bf16"):
        return torch.bfloat16
    return torch.float16 if precision.startswith("16") else torch.float32


def attention_report(model: nn.Module, device: torch.device, dtype: torch.dtype) -> str:
    """Which attention the model runs: diffusers' processors by class and, for its first
    attention layer's head size, the kernel `F.scaled_dot_product_attention` picks on this
    device and dtype (flash, memory-efficient, cuDNN or math)."""
    from diffusers.models.attention_processor import Attention

    procs = getattr(model, "attn_processors", {}) or {}
    counts = Counter(type(proc).__name__ for proc in procs.values())
    names = ", ".join(f"{c} x {n}" for n, c in sorted(counts.items())) or "no diffusers processors"
    first = next((m for m in model.modules() if isinstance(m, Attention)), None)
    if first is None:
        return f"attention: {names}"
    head_dim = first.inner_dim // first.heads
    return (f"attention: {names}; SDPA kernel for {first.heads} heads of {head_dim} in "
            f"{str(dtype).removeprefix('torch.')} on {device.type}: "
            f"{sdpa_kernel_name(first.heads, head_dim, device, dtype)}")  # fmt: skip


def sdpa_kernel_name(heads: int, head_dim: int, device: torch.device, dtype: torch.dtype) -> str:
    """The backend torch's SDPA dispatch picks for such inputs (no mask, no dropout)."""
    from torch.nn.attention import SDPBackend

    q = torch.zeros(1, heads, 64, head_dim, device=device, dtype=dtype)
    # torch's own dispatch decision; no public API names the kernel it will run.
    return SDPBackend(torch._fused_sdp_choice(q, q, q)).name.lower()
