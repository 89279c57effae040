"""Lightning strategies that also run where Lightning's own refuse: DeepSpeed and FSDP on CPU."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies import DeepSpeedStrategy as _LightningDeepSpeed
from lightning.pytorch.strategies import FSDPStrategy as _LightningFSDP


class DeepSpeedStrategy(_LightningDeepSpeed):
    """Lightning's DeepSpeedStrategy, which on a CPU accelerator trains with DeepSpeed's CPU
    backend (gloo) instead of refusing.

    Lightning checks for CUDA and hands DeepSpeed ``root_device.index`` (None on CPU), yet
    DeepSpeed itself runs ZeRO-1/2/3 on CPU processes when ``DS_ACCELERATOR=cpu``. Running the
    same ZeRO configs on a laptop or in CI is what makes sharded checkpoints and exports testable
    without GPUs, so on CPU this class (1) sets up the environment like DDP, (2) reports
    ``cpu:<local_rank>`` as its root device and (3) skips the CUDA device-index validation.
    On GPUs it is Lightning's class unchanged.
    """

    @property
    def _on_cpu(self) -> bool:
        return isinstance(self.accelerator, CPUAccelerator)

    def setup_environment(self) -> None:
        if self._on_cpu:
            _use_deepspeed_cpu_accelerator()
            DDPStrategy.setup_environment(self)
        else:
            super().setup_environment()

    def setup_distributed(self) -> None:
        if not self._on_cpu:
            return super().setup_distributed()
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @property
    def root_device(self) -> torch.device:
        if self._on_cpu:
            return torch.device("cpu", self.local_rank)
        return super().root_device

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        # A module that loads non-strictly (an adapter run, whose frozen base comes from
        # model.base again) is saved without its frozen parameters: Lightning's load passes
        # load_module_strict=strict_loading, so such a checkpoint holds only what trains.
        if not self.lightning_module.strict_loading:
            self.exclude_frozen_parameters = True
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def _auto_select_batch_size(self) -> int:
        # Lightning reads the DataLoader's batch_sampler; ours batch inside the dataset.
        datamodule = self.lightning_module.trainer.datamodule
        size = getattr(datamodule, "batch_size", None)
        return int(size) if size else super()._auto_select_batch_size()


def _use_deepspeed_cpu_accelerator() -> None:
    # DeepSpeed picks CUDA wherever it sees a GPU, even for a run configured for CPU.
    from deepspeed.accelerator import get_accelerator, set_accelerator
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    if get_accelerator().device_name() != "cpu":
        set_accelerator(CPU_Accelerator())


class FSDPStrategy(_LightningFSDP):
    """Lightning's FSDPStrategy, which also runs on CPU processes (gloo).

    PyTorch's FSDP shards and trains on CPU with gloo; Lightning refuses any accelerator but
    CUDA for its own class only (an exact type check), then hands FSDP ``device_id=None`` (which
    FSDP reads as "find an accelerator") and the CPU barrier ``device_ids=[None]``. On CPU this
    subclass passes ``device_id=cpu`` and a plain barrier, so the same sharding configs run in CI
    and on laptops; on GPUs it is Lightning's class unchanged.
    """

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        backbone = getattr(model, "backbone", None)
        if "auto_wrap_policy" not in self.kwargs and backbone is not None and backbone.wrap_units():
            # The backbone knows its blocks: each becomes an FSDP unit unless the config says.
            self.kwargs["auto_wrap_policy"] = wrap_policy(backbone.wrap_units(), backbone.model)
        if self.root_device.type != "cpu":
            return super()._setup_model(model)
        # Lightning's private helper, so that activation checkpointing is set up exactly as its
        # GPU path (`super()._setup_model`) does; this branch mirrors that method for CPU.
        from lightning.pytorch.strategies.fsdp import _setup_activation_checkpointing
        from torch.distributed.fsdp import FullyShardedDataParallel

        model = FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )
        _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        return model

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict:
        path = Path(self.broadcast(checkpoint_path))
        if self.lightning_module.strict_loading or not (path / ".metadata").is_file():
            return super().load_checkpoint(path, weights_only)
        return self._load_sharded_subset(path, weights_only)

    def _load_sharded_subset(self, path: Path, weights_only: bool | None) -> dict:
        """Lightning's sharded load for a checkpoint that holds part of the module (an adapter
        run's: its frozen base comes from model.base again). Lightning's own asks the files for
        every key of the module and fails on the first one they lack; this asks only for what
        the files hold, then loads the optimizer states as Lightning does."""
        from lightning.pytorch.trainer.states import TrainerFn
        from torch.distributed.checkpoint import FileSystemReader, load
        from torch.distributed.checkpoint.optimizer import load_sharded_optimizer_state_dict
        from torch.distributed.fsdp import FullyShardedDataParallel, StateDictType
        from torch.distributed.fsdp.api import ShardedOptimStateDictConfig, ShardedStateDictConfig

        saved = set(FileSystemReader(path).read_metadata().state_dict_metadata)
        fitting = self.lightning_module.trainer.state.fn == TrainerFn.FITTING
        # The sharded state-dict context Lightning's save and load use (host-memory shards).
        sharded = FullyShardedDataParallel.state_dict_type(
            self.model, StateDictType.SHARDED_STATE_DICT,
            ShardedStateDictConfig(offload_to_cpu=True),
            ShardedOptimStateDictConfig(offload_to_cpu=True),
        )  # fmt: skip
        with sharded:
            state = {k: v for k, v in self.model.state_dict().items() if f"model.{k}" in saved}
            load({"model": state}, storage_reader=FileSystemReader(path))
            self.model.load_state_dict(state, strict=False)
            for idx, optim in enumerate(self.optimizers if fitting else []):
                key = f"optimizer_{idx}"
                osd = load_sharded_optimizer_state_dict(
                    model_state_dict=state, optimizer_key=key, storage_reader=FileSystemReader(path)
                )
                optim.load_state_dict(FullyShardedDataParallel.optim_state_dict_to_load(
                    model=self.model, optim=optim, optim_state_dict=osd[key]))  # fmt: skip
        return torch.load(path / "meta.pt", weights_only=weights_only)

    def barrier(self, name: str | None = None) -> None:
        if self.root_device.type == "cpu" and torch.distributed.is_initialized():
            torch.distributed.barrier()
            return
        super().barrier(name)


def wrap_policy(units: set[type[torch.nn.Module]], model: torch.nn.Module):
    """FSDP's auto-wrap policy for `unit_filter`'s units."""
    from torch.distributed.fsdp.wrap import CustomPolicy, ModuleWrapPolicy

    from train.models import adapters

    if not adapters.has_adapter(model):
        return ModuleWrapPolicy(units)
    return CustomPolicy(unit_filter(units, model))


def unit_filter(
    units: set[type[torch.nn.Module]], model: torch.nn.Module
) -> Callable[[torch.nn.Module], bool]:
    """Which submodules are sharding units (FSDP and FSDP2 alike): the backbone's blocks and,
    when an adapter trains, each layer holding adapter weights (`adapter_leaves`), so frozen
    and trained weights never share a unit."""
    from train.models import adapters

    kinds = tuple(units)
    adapted = adapters.has_adapter(model)
    leaves = {id(m) for m in adapters.adapter_leaves(model)} if adapted else set()
    return lambda m: isinstance(m, kinds) or id(m) in leaves


def module_types(names: list[str]) -> set[type[torch.nn.Module]]:
    """Classes from dotted names, for FSDP's ``auto_wrap_policy`` and activation checkpointing."""
    from hydra.utils import get_class

    return {get_class(name) for name in names}
