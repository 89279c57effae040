"""FSDP2 (`torch.distributed.fsdp.fully_shard`) as a Lightning strategy, on GPUs and on CPU.

FSDP2 shards each parameter as a DTensor (dim 0 over the ranks), so a parameter keeps its name,
shape and dtype, frozen and trained weights may share a unit, and the checkpoint is
torch.distributed.checkpoint's. Lightning reaches it through `ModelParallelStrategy`, which
expects the LightningModule to call `fully_shard` itself in ``configure_model``; here the
strategy does it from what the backbone states (its blocks, `Backbone.wrap_units`), so tasks and
models stay strategy-agnostic, as under `FSDPStrategy`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.strategies.strategy import Strategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from torch.distributed.fsdp import FSDPModule

from train.distributed.strategies import unit_filter
from train.errors import ConfigError
from train.models.unwrap import model_class


class FSDP2Strategy(ModelParallelStrategy):
    """Each backbone block (and each layer holding adapter weights) is a ``fully_shard`` unit,
    the backbone's model the root unit; the frozen VAE and text encoder stay whole on every rank.

    ``reshard_after_forward``: free each unit's gathered weights after its forward (ZeRO-3-like
    memory, a second all-gather in backward) or keep them to the backward (ZeRO-2-like).
    ``param_dtype`` / ``reduce_dtype``: FSDP2's mixed-precision policy (e.g. ``bfloat16`` for
    the gathered weights and the compute, ``float32`` for the gradient reduction), with float32
    sharded master weights; None keeps the parameters' dtype (then ``trainer.precision`` may
    still autocast). ``replicate_across_nodes``: HSDP, shards within a node and replicas across
    nodes (a 2D mesh ``(nodes, processes per node)``), so all-gathers stay on the node's links.
    """

    def __init__(
        self,
        reshard_after_forward: bool = True,
        param_dtype: str | None = None,
        reduce_dtype: str | None = None,
        replicate_across_nodes: bool = False,
        save_distributed_checkpoint: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)
        self.reshard_after_forward = reshard_after_forward
        self.param_dtype, self.reduce_dtype = _dtype(param_dtype), _dtype(reduce_dtype)
        self.replicate_across_nodes = replicate_across_nodes

    def setup_environment(self) -> None:
        # ModelParallelStrategy's mesh is (data, tensor) parallel for its configure_model users;
        # FSDP2 alone shards over every rank, or within nodes under HSDP.
        self._setup_distributed()
        self._device_mesh = self._mesh()
        self.lightning_module._device_mesh = self._device_mesh

    def _mesh(self):
        from torch.distributed.device_mesh import init_device_mesh

        kind = self.root_device.type
        if self.replicate_across_nodes and self.num_nodes > 1:
            shape = (self.num_nodes, self.num_processes)
            return init_device_mesh(kind, shape, mesh_dim_names=("replicate", "shard"))
        return init_device_mesh(kind, (self.world_size,), mesh_dim_names=("shard",))

    @property
    def shard_group(self) -> torch.distributed.ProcessGroup:
        """The ranks that split each parameter (all of them, or a node's under HSDP)."""
        return self.device_mesh.get_group("shard")

    @property
    def distributed_sampler_kwargs(self) -> dict[str, int]:
        return {"num_replicas": self.world_size, "rank": self.global_rank}

    def setup(self, trainer) -> None:
        # ModelParallelStrategy.setup refuses a LightningModule without configure_model; the
        # base Strategy.setup calls `_setup_model`, which shards it here, before the optimizers
        # are built over the sharded parameters.
        Strategy.setup(self, trainer)

    def model_to_device(self) -> None:
        # Strategy.setup moves the module before `_setup_model`; fully_shard moves each unit to
        # the mesh's device as it shards it instead (one unit's whole weights there at a time,
        # so a model larger than one device fits), and `_setup_model` moves the rest after.
        if any(isinstance(m, FSDPModule) for m in self.model.modules()):
            self.model.to(self.root_device)

    def _setup_model(self, model: nn.Module) -> nn.Module:
        trainable = getattr(model, "trainable", None)
        backbone = getattr(model, "backbone", None)
        if trainable is None or backbone is None:
            raise ConfigError(
                f"strategy=fsdp2 shards a backbone's blocks, and {type(model).__name__} has no "
                "backbone: use strategy=ddp, deepspeed_zero1 or deepspeed_zero2"
            )
        from torch.distributed.fsdp import MixedPrecisionPolicy

        policy = MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=self.reduce_dtype)
        options = {"mesh": self.device_mesh, "reshard_after_forward": self.reshard_after_forward,
                   "mp_policy": policy}  # fmt: skip
        units = shard_blocks(trainable, unit_filter(backbone.wrap_units(), trainable), options)
        check_all_trained_sharded(model)
        model.to(self.root_device)  # what no unit holds (buffers, frozen modules)
        dims = zip(self.device_mesh.mesh_dim_names, self.device_mesh.shape, strict=True)
        layout = " x ".join(f"{name} {size}" for name, size in dims)
        rank_zero_info(f"FSDP2: {units} units of {model_class(trainable).__name__} over {layout}")
        return model

    def validation_step(self, *args, **kwargs):
        # FSDP2 keeps the root unit gathered after a forward no backward follows; EMA, gathers
        # and checkpoints read the shards.
        try:
            return super().validation_step(*args, **kwargs)
        finally:
            reshard(self.model)

    def lightning_module_state_dict(self) -> dict:
        reshard(self.model)  # a no-grad forward (validation) leaves the root unit gathered
        return super().lightning_module_state_dict()

    def optimizer_state(self, optimizer) -> dict:
        reshard(self.model)
        return super().optimizer_state(optimizer)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict:
        path = Path(self.broadcast(checkpoint_path))
        if self.lightning_module.strict_loading or not (path / ".metadata").is_file():
            return super().load_checkpoint(path, weights_only)
        return self._load_saved_subset(path, weights_only)

    def _load_saved_subset(self, path: Path, weights_only: bool | None) -> dict:
        """A sharded checkpoint that holds part of the module (an adapter run's: its frozen
        base comes from model.base again). Lightning's load asks the files for every key of the
        module; this asks only for those they hold, then loads the optimizer states."""
        from lightning.pytorch.trainer.states import TrainerFn
        from torch.distributed.checkpoint import FileSystemReader, load
        from torch.distributed.checkpoint.state_dict import StateDictOptions as Options
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        saved = set(FileSystemReader(path).read_metadata().state_dict_metadata)
        live = get_model_state_dict(self.model)
        state = {k: v for k, v in live.items() if f"state_dict.{k}" in saved}
        load({"state_dict": state}, storage_reader=FileSystemReader(path))
        set_model_state_dict(self.model, state, options=Options(strict=False))
        fitting = self.lightning_module.trainer.state.fn == TrainerFn.FITTING
        for idx, optim in enumerate(self.optimizers if fitting else []):
            key = f"optimizer_{idx}"
            osd = {key: get_optimizer_state_dict(self.model, optim)}
            load(osd, storage_reader=FileSystemReader(path))
            set_optimizer_state_dict(self.model, optim, osd[key])
        return torch.load(path / "meta.pt", weights_only=weights_only)


def shard_blocks(root: nn.Module, is_unit: Callable[[nn.Module], bool], options: dict) -> int:
    """``fully_shard`` every unit below ``root``, innermost first (a unit's parameters are those
    no inner unit took), then ``root`` itself; returns the number of units."""
    from torch.distributed.fsdp import fully_shard

    units = [m for m in reversed(list(root.modules())) if m is not root and is_unit(m)]
    for module in units:  # reversed pre-order: children before their parents
        fully_shard(module, **options)
    fully_shard(root, **options)
    return len(units) + 1


def check_all_trained_sharded(model: nn.Module) -> None:
    """A trained parameter outside the sharded model would get no gradient reduction."""
    from torch.distributed.tensor import DTensor

    params = model.named_parameters()
    loose = [n for n, p in params if p.requires_grad and not isinstance(p, DTensor)]
    if loose:
        raise ConfigError(
            f"strategy=fsdp2 shards the backbone's model only, but {len(loose)} trained "
            f"parameters lie outside it ({loose[0]}, ...): train them under strategy=ddp or "
            "deepspeed_zero2"
        )


def reshard(model: nn.Module) -> None:
    """Every FSDP2 unit back to its shards (a no-op for those already sharded)."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"strategy: {name!r} is not a torch dtype; use bfloat16, float16 or "
                          "float32 (or null)")  # fmt: skip
    return dtype
