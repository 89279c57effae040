"""Lightning strategies that also run where Lightning's own refuse: DeepSpeed and FSDP on CPU."""

from __future__ import annotations

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
            from torch.distributed.fsdp.wrap import ModuleWrapPolicy

            self.kwargs["auto_wrap_policy"] = ModuleWrapPolicy(backbone.wrap_units())
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

    def barrier(self, name: str | None = None) -> None:
        if self.root_device.type == "cpu" and torch.distributed.is_initialized():
            torch.distributed.barrier()
            return
        super().barrier(name)


def module_types(names: list[str]) -> set[type[torch.nn.Module]]:
    """Classes from dotted names, for FSDP's ``auto_wrap_policy`` and activation checkpointing."""
    from hydra.utils import get_class

    return {get_class(name) for name in names}
