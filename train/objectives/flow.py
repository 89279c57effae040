"""Rectified flow (Liu et al. 2023; Esser et al. 2024, SD3) as pure functions plus the objective.

The timestep densities and SD3's loss weightings come from `diffusers.training_utils`; the shift
and the interpolation are one line each and written here, as diffusers' training scripts do.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.training_utils import (
    compute_density_for_timestep_sampling,
    compute_loss_weighting_for_sd3,
)

from train.objectives.base import Draws, Noised


def shift_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    """Resolution shift s*u / (1 + (s - 1) u) of noise levels (Esser et al. 2024, eq. 23)."""
    return shift * u / (1.0 + (shift - 1.0) * u)


def interpolate(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - sigma) x0 + sigma eps, the straight path (Liu et al. 2023)."""
    s = sigma.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1.0 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The flow's velocity eps - x0, what the transformer predicts (Liu et al. 2023)."""
    return noise - x0


class RectifiedFlow:
    """The rectified-flow objective as SD3 and Flux train it: a timestep density
    (`logit_normal`, `mode` or `uniform`), a shift, and a loss weighting (`none`, `sigma_sqrt`,
    `cosmap`); timesteps reach the backbone as sigma * num_train_timesteps."""

    kind = "flow"

    def __init__(
        self,
        density: str = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        shift: float = 1.0,
        loss_weighting: str = "none",
        num_train_timesteps: int = 1000,
        scheduler: dict | None = None,
        scheduler_class: str = "FlowMatchEulerDiscreteScheduler",
    ) -> None:
        if density not in ("logit_normal", "mode", "uniform"):
            raise ValueError(f"model.objective.density={density!r}: use logit_normal, mode or "
                             "uniform")  # fmt: skip
        if loss_weighting not in ("none", "sigma_sqrt", "cosmap"):
            raise ValueError(f"model.objective.loss_weighting={loss_weighting!r}: use none, "
                             "sigma_sqrt or cosmap")  # fmt: skip
        self.density, self.shift, self.loss_weighting = density, shift, loss_weighting
        self.logit_mean, self.logit_std, self.mode_scale = logit_mean, logit_std, mode_scale
        self.num_train_timesteps = num_train_timesteps
        # The sampler the export ships and previews use (a diffusers class name, e.g.
        # DPMSolverMultistepScheduler with use_flow_sigmas for pipelines that need
        # init_noise_sigma); FlowMatchEuler's shift is the training shift unless set apart.
        self.export_scheduler = self.preview_scheduler = scheduler_class
        shift_key = {"shift": shift} if scheduler_class.startswith("FlowMatch") else {}
        self.scheduler_kwargs = {**shift_key, **(scheduler or {})}

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str, subfolder: str = "scheduler", **kwargs: Any
    ) -> RectifiedFlow:
        """The objective of a pretrained flow pipeline: its scheduler's class, options, shift and
        timesteps (``scheduler/`` of SD3 Medium or of an export of ours), so that fine-tuning
        trains the base as it was trained and the export samples as the base did; ``kwargs``: the
        training-only settings (density, loss weighting)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        where = f"{pretrained_model_name_or_path}/{subfolder}"
        config = FlowMatchEulerDiscreteScheduler.load_config(
            pretrained_model_name_or_path, subfolder=subfolder
        )
        name = str(config.get("_class_name", ""))
        if not (name.startswith("FlowMatch") or config.get("use_flow_sigmas")):
            raise ValueError(
                f"{where} holds a {name or 'scheduler'} without flow sigmas: the base was not "
                "trained by rectified flow; use model/objective=ddpm_pretrained"
            )
        options = {k: v for k, v in config.items() if not k.startswith("_")}
        shift = float(options.get("shift", options.get("flow_shift")) or 1.0)
        steps = int(options.pop("num_train_timesteps", 1000))
        return cls(shift=shift, num_train_timesteps=steps, scheduler=options,
                   scheduler_class=name, **kwargs)  # fmt: skip

    def draw(self, x0: torch.Tensor, rng: Draws) -> Noised:
        noise = rng.randn(tuple(x0.shape[1:]), x0.dtype)
        u = torch.cat([self._density(g, rng.device) for g in rng.generators])
        return self.at_levels(x0, noise, u)

    def _density(self, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        # One sample per generator: every sample's level comes from its own stream.
        return compute_density_for_timestep_sampling(
            self.density, 1, self.logit_mean, self.logit_std, self.mode_scale,
            device=device, generator=generator,
        )  # fmt: skip

    def at_levels(self, x0: torch.Tensor, noise: torch.Tensor, u: torch.Tensor) -> Noised:
        sigma = shift_sigmas(u.to(x0.device, torch.float32), self.shift)
        weights = compute_loss_weighting_for_sd3(self.loss_weighting, sigma)
        x_t = interpolate(x0, noise, sigma)
        t = sigma * self.num_train_timesteps
        return Noised(x_t, t, velocity_target(x0, noise), weights.float())

    def scheduler_config(self) -> dict:
        return {"num_train_timesteps": self.num_train_timesteps, **self.scheduler_kwargs}
