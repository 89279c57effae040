"""Which exported schedulers can sample a rectified flow in pipelines built for DDPM schedulers.

StableDiffusion[XL]Pipeline and the PixArt pipelines scale the first latents by
`init_noise_sigma` and call `scale_model_input` each step; FlowMatch schedulers have neither, so
a flow-trained UNet or PixArt DiT ships DPM-Solver++ on flow sigmas instead (as Sana's pipeline
does), which reads the model output as the velocity eps - x0.
"""

from __future__ import annotations

from typing import Any

import diffusers

from train.errors import ConfigError

FLOW_PRESET = "model/objective=flow_dpm"


def flow_scheduler_problem(cls_name: str, config: dict) -> str | None:
    """Why the scheduler `cls_name(**config)` cannot sample a rectified flow in a pipeline that
    scales by `init_noise_sigma`, or None (x_t = (1 - s) x0 + s eps, velocity output)."""
    cls = getattr(diffusers, cls_name, None)
    if cls is None:
        return f"diffusers has no scheduler class {cls_name}"
    scheduler = cls.from_config(config)
    missing = [a for a in ("init_noise_sigma", "scale_model_input") if not hasattr(scheduler, a)]
    if missing:
        return f"{cls_name} has no {' or '.join(missing)}, which the pipeline calls"
    if not scheduler.config.get("use_flow_sigmas"):
        return f"{cls_name} without use_flow_sigmas=true samples a DDPM schedule, not the flow's"
    if scheduler.config.get("prediction_type") != "flow_prediction":
        return f"{cls_name} without prediction_type=flow_prediction reads no velocity"
    return None


def check_flow_sampler(objective: Any, pipeline_class: str) -> None:
    """ConfigError naming the preset when `objective`'s export scheduler cannot sample its flow
    in `pipeline_class`."""
    name = objective.export_scheduler
    problem = flow_scheduler_problem(name, objective.scheduler_config())
    if problem:
        raise ConfigError(
            f"model.objective.scheduler_class={name}: {problem}, so {pipeline_class} cannot "
            f"sample this flow; use {FLOW_PRESET} (scheduler_class=DPMSolverMultistepScheduler, "
            "scheduler: {use_flow_sigmas: true, prediction_type: flow_prediction, "
            "flow_shift: ...})"
        )
