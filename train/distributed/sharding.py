"""Whole weights from sharded training: gathered live (ZeRO-3, FSDP) or read from checkpoints.

Exports, previews and EMA need the full UNet on global rank 0 whatever the strategy. Under DDP
and ZeRO-1/2 every rank already holds it; under ZeRO-3 and FSDP each rank holds a slice, so the
gather is a collective that every rank must enter. Checkpoints written by those strategies are
folders of shards, turned back into one Lightning checkpoint dict by `load_any_checkpoint`.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

StateDict = dict[str, torch.Tensor]


def is_zero3(strategy: object) -> bool:
    return isinstance(strategy, DeepSpeedStrategy) and bool(strategy.zero_stage_3)


def is_fsdp2(strategy: object) -> bool:
    """FSDP2 (`fully_shard`): parameters are DTensors, each rank holding a slice of dim 0."""
    return isinstance(strategy, ModelParallelStrategy)


def is_fsdp(strategy: object) -> bool:
    """Either FSDP: the flat-parameter wrapper (`FSDPStrategy`) or FSDP2."""
    return isinstance(strategy, FSDPStrategy) or is_fsdp2(strategy)


def is_sharded(strategy: object) -> bool:
    """True where a rank's parameters are slices (ZeRO-3, FSDP, FSDP2), not whole tensors."""
    return is_zero3(strategy) or is_fsdp(strategy)


def local_tensors(strategy: object, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """The storage of this rank's part of each parameter, aligned across calls.

    ZeRO-3: ``ds_tensor``, the rank's flat partition (DeepSpeed pads the last one). FSDP with
    ``use_orig_params`` (Lightning's default): the parameter itself is a flat view into the
    rank's shard, possibly empty. FSDP2: the DTensor's local slice of dim 0 (a view of it).
    DDP, ZeRO-1/2 and one device: the whole parameter.
    """
    if is_zero3(strategy):
        return [p.ds_tensor for p in params]
    return local_parts([p.data for p in params])


def local_parts(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor's part on this rank: a DTensor's local slice (a view; FSDP2's parameters
    and gradients), any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]


def clean_name(name: str) -> str:
    """A parameter name without the wrappers FSDP and activation checkpointing insert."""
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


def submodule_prefix(root: torch.nn.Module, module: torch.nn.Module) -> str:
    for name, sub in root.named_modules():
        if sub is module:
            return f"{name}." if name else ""
    raise ValueError(f"{type(module).__name__} is not a submodule of {type(root).__name__}")


def full_state_dict(trainer: L.Trainer, module: torch.nn.Module) -> StateDict | None:
    """Collective: ``module``'s whole state (CPU tensors) on global rank 0, None elsewhere."""
    strategy = trainer.strategy
    if is_zero3(strategy):
        state = _gather_zero3(module, trainer.is_global_zero)
    elif is_fsdp(strategy):
        offload = strategy.root_device.type != "cpu"
        state = _gather_fsdp(strategy.model, trainer.lightning_module, module, offload)
    else:
        state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    return state if trainer.is_global_zero else None


def _gather_zero3(module: torch.nn.Module, keep: bool, frozen_only: bool = False) -> StateDict:
    import deepspeed

    # One submodule at a time, so at most one layer's full weights exist besides the shards.
    state: StateDict = {}
    for name, sub in module.named_modules():
        prefix = f"{name}." if name else ""
        params = list(sub.named_parameters(recurse=False))
        if frozen_only:
            params = [(k, p) for k, p in params if not p.requires_grad]
        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
            if keep:
                state.update({prefix + k: p.detach().cpu().clone() for k, p in params})
    return {**state, **persistent_buffers(module)} if keep else state


def persistent_buffers(module: torch.nn.Module) -> StateDict:
    """Buffers that belong in a state dict (never partitioned by ZeRO-3)."""
    out: StateDict = {}
    for name, sub in module.named_modules():
        prefix = clean_name(f"{name}.") if name else ""
        for k, b in sub.named_buffers(recurse=False):
            # torch has no public test for persistence; state_dict() would gather ZeRO-3 params.
            if k not in sub._non_persistent_buffers_set:
                out[prefix + k] = b.detach().cpu().clone()
    return out


def _gather_fsdp(
    root: torch.nn.Module, pl_module: L.LightningModule, module: torch.nn.Module, offload: bool
) -> StateDict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # cpu_offload (rank 0 only, in host memory) is what GPUs want; with CPU tensors it
    # crashes gloo processes (SIGSEGV, torch 2.13), and is pointless there anyway.
    options = StateDictOptions(full_state_dict=True, cpu_offload=offload)
    full = get_model_state_dict(root, options=options)
    prefix = submodule_prefix(pl_module, module)
    # Where nothing needs gathering (HSDP with one process per node) the "full" tensors are the
    # live ones: copies, so that EMA weights swapped in for the gather stay in the result.
    copy = (lambda v: v) if offload else torch.Tensor.clone
    return {k[len(prefix) :]: copy(v.cpu()) for k, v in full.items() if k.startswith(prefix)}


def gather_zero3_shards(
    trainer: L.Trainer, module: torch.nn.Module, shards: list[torch.Tensor]
) -> StateDict | None:
    """Collective: whole tensors on global rank 0 from per-rank flat ZeRO-3 partitions of
    ``module``'s trained parameters (e.g. EMA shards aligned with ``ds_tensor``), plus its
    buffers and its frozen parameters (an adapter's base), gathered live."""
    named = trained(module)
    frozen = _gather_zero3(module, trainer.is_global_zero, frozen_only=True)
    flat = torch.cat([s.reshape(-1).float() for s in shards])
    rank0 = trainer.is_global_zero
    parts = [torch.empty_like(flat) for _ in range(trainer.world_size)] if rank0 else None
    torch.distributed.gather(flat, parts, dst=0)
    if not rank0:
        return None
    state: StateDict = {}
    offset = 0
    for (name, p), shard in zip(named, shards, strict=True):
        n = shard.numel()
        pieces = [part[offset : offset + n].cpu() for part in parts]
        state[clean_name(name)] = zero3_unpartition(pieces, list(p.ds_shape))
        offset += n
    return {**frozen, **state}


def gather_fsdp_shards(
    trainer: L.Trainer, module: torch.nn.Module, shards: list[torch.Tensor]
) -> StateDict | None:
    """Collective: whole tensors on global rank 0 from each rank's FSDP pieces of ``module``'s
    trained parameters (e.g. EMA shards aligned with `local_tensors`), plus its buffers and
    frozen parameters (an adapter's base) from the live model.

    Copying such values into the live shards and gathering the model would not do: after a
    no-grad forward (validation) FSDP keeps the root unit's unsharded parameters allocated and
    its state-dict gather reuses them, stale, instead of the shards. FSDP lays each parameter out
    contiguously in the flat parameter that ranks split in order, so a parameter is its ranks'
    pieces concatenated in rank order; its shape comes from the gathered live model.
    """
    whole = full_state_dict(trainer, module)  # names, shapes and buffers (rank 0)
    flat = torch.cat([s.reshape(-1).float() for s in shards])
    sizes = [None] * trainer.world_size
    torch.distributed.all_gather_object(sizes, [s.numel() for s in shards])
    longest = max(sum(per_rank) for per_rank in sizes)
    padded = torch.cat([flat, flat.new_zeros(longest - flat.numel())])
    padded = padded.to(trainer.strategy.root_device)  # NCCL gathers device tensors only
    rank0 = trainer.is_global_zero
    parts = [torch.empty_like(padded) for _ in range(trainer.world_size)] if rank0 else None
    torch.distributed.gather(padded, parts, dst=0)
    if not rank0:
        return None
    names = [clean_name(n) for n, _ in trained(module)]
    offsets = [0] * trainer.world_size
    for i, name in enumerate(names):
        pieces = []
        for r, part in enumerate(parts):
            pieces.append(part[offsets[r] : offsets[r] + sizes[r][i]].cpu())
            offsets[r] += sizes[r][i]
        whole[name] = torch.cat(pieces).reshape(whole[name].shape).to(whole[name].dtype)
    return whole


def trained(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """``module``'s parameters that train, in order: all of them, or an adapter's."""
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def zero3_partition(whole: torch.Tensor, rank: int, partition_numel: int) -> torch.Tensor:
    """Rank ``rank``'s slice of a parameter as DeepSpeed ZeRO-3 partitions it: the flattened
    tensor, padded with zeros to ``world * partition_numel``, in equal contiguous pieces."""
    flat = whole.reshape(-1)
    start = rank * partition_numel
    piece = flat[start : start + partition_numel]
    if piece.numel() < partition_numel:
        piece = torch.cat([piece, piece.new_zeros(partition_numel - piece.numel())])
    return piece


def zero3_unpartition(shards: list[torch.Tensor], shape: list[int]) -> torch.Tensor:
    """Inverse of `zero3_partition`: one parameter from every rank's slice, in rank order."""
    numel = 1
    for d in shape:
        numel *= d
    return torch.cat([s.reshape(-1) for s in shards])[:numel].reshape(shape)


def load_any_checkpoint(path: str | Path, allow_pickle: bool = False) -> dict:
    """A Lightning checkpoint as one dict with a full ``state_dict``: a ``.ckpt`` file (read
    with ``weights_only=True``: no code runs), or, with ``allow_pickle``, a DeepSpeed checkpoint
    folder (any ZeRO stage) or an FSDP sharded checkpoint folder, whose readers unpickle."""
    path = Path(path)
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not allow_pickle:
        raise ValueError(
            f"{path} is a sharded checkpoint folder: DeepSpeed's and torch.distributed's readers "
            "unpickle parts of it, which runs code from the files. Pass --allow-pickle (ldm-export)"
            " only for checkpoints you trust"
        )
    if (path / "latest").is_file() or (path / "checkpoint").is_dir():
        return _load_deepspeed(path)
    if (path / "meta.pt").is_file():
        return _load_fsdp(path)
    raise ValueError(
        f"{path} is a folder but neither a DeepSpeed checkpoint (no 'latest' or 'checkpoint/') "
        "nor an FSDP sharded checkpoint (no 'meta.pt')"
    )


def _load_fsdp(path: Path) -> dict:
    """Lightning's FSDP folder: the shards in torch.distributed.checkpoint's format, read by
    torch's public converter into one file, plus Lightning's own data in ``meta.pt``."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory(prefix="ldm-dcp-") as tmp:
        dcp_to_torch_save(path, Path(tmp) / "full.pt")
        ckpt = torch.load(Path(tmp) / "full.pt", map_location="cpu", weights_only=False)
    ckpt.update(torch.load(path / "meta.pt", map_location="cpu", weights_only=False))
    ckpt["state_dict"] = ckpt.pop("model", ckpt.get("state_dict", {}))
    return ckpt


def _load_deepspeed(path: Path) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = (path / "latest").read_text().strip() if (path / "latest").is_file() else "checkpoint"
    state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=tag)
    # Client state (Lightning's loops, callbacks, our config) lives in the model-states files;
    # under ZeRO-3 each rank wrote its own, and per-rank callback state (EMA shards) with it.
    files = sorted(glob.glob(os.path.join(path, tag, "*model_states.pt")), key=_rank_of)
    if not files:
        raise ValueError(f"{path}/{tag} holds no *model_states.pt: an incomplete checkpoint")
    states = [torch.load(f, map_location="cpu", weights_only=True) for f in files]
    ckpt = {k: v for k, v in states[0].items() if k not in _DEEPSPEED_KEYS}
    ckpt["state_dict"] = {k.removeprefix("_forward_module."): v for k, v in state.items()}
    ckpt["rank_callbacks"] = [s.get("callbacks", {}) for s in states]
    return ckpt


_DEEPSPEED_KEYS = {
    "module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes",
    "shared_params", "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd",
    "sparse_tensor_module_names", "skipped_steps", "global_steps", "global_samples",
    "dp_world_size", "mp_world_size", "ds_config", "ds_version", "csr_tensor_module_names",
}  # fmt: skip


def _rank_of(filename: str) -> int:
    name = os.path.basename(filename)
    return int(name.split("_")[3]) if name.startswith("zero_pp_rank_") else 0
