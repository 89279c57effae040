"""What every task's `configure_optimizers` returns, from the config's partial factories."""

from __future__ import annotations

from collections.abc import Callable

import torch

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


def optimizer_config(
    params, optimizer: OptimizerFactory, lr_scheduler: SchedulerFactory | None
) -> torch.optim.Optimizer | dict:
    """The optimizer, and its schedule stepped per step."""
    opt = optimizer(params)  # positional: DeepSpeedCPUAdam names it model_params
    if lr_scheduler is None:
        return opt
    return {"optimizer": opt, "lr_scheduler": {"scheduler": lr_scheduler(opt), "interval": "step"}}
