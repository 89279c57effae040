"""Rectified flow: the path, the target, the shift, densities and SD3 weightings."""

import math

import pytest
import torch
from test_ddpm import Draws

from train.objectives.base import stratified_levels
from train.objectives.flow import RectifiedFlow, interpolate, shift_sigmas, velocity_target


def test_the_path_goes_from_data_to_noise_and_the_target_is_its_velocity():
    x0, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    sigma = torch.tensor([0.0, 0.5, 1.0])
    x_t = interpolate(x0, eps, sigma)
    torch.testing.assert_close(x_t[0], x0[0])
    torch.testing.assert_close(x_t[2], eps[2])
    torch.testing.assert_close(x_t[1], 0.5 * (x0[1] + eps[1]))
    # d x_t / d sigma = eps - x0: one Euler step along the target lands on the noise
    torch.testing.assert_close(x_t[1] + 0.5 * velocity_target(x0, eps)[1], eps[1])


def test_shift_moves_levels_towards_noise_and_one_is_identity():
    u = torch.tensor([0.0, 0.25, 0.5, 1.0])
    torch.testing.assert_close(shift_sigmas(u, 1.0), u)
    shifted = shift_sigmas(u, 3.0)
    assert float(shifted[0]) == 0.0 and float(shifted[-1]) == 1.0
    assert math.isclose(float(shifted[2]), 0.75, rel_tol=1e-6)  # 3 * .5 / (1 + 2 * .5)


@pytest.mark.parametrize("density", ["logit_normal", "mode", "uniform"])
def test_draws_are_per_sample_reproducible_and_in_range(density):
    x0 = torch.randn(6, 4, 2, 2)
    flow = RectifiedFlow(density=density, shift=3.0, num_train_timesteps=1000)
    a, b = flow.draw(x0, Draws(6)), flow.draw(x0, Draws(6))
    assert torch.equal(a.timesteps, b.timesteps) and torch.equal(a.x_t, b.x_t)
    assert ((a.timesteps >= 0) & (a.timesteps <= 1000)).all()
    # the first rows do not depend on how many rows the batch has
    first = flow.draw(x0[:2], Draws(2))
    torch.testing.assert_close(first.timesteps, a.timesteps[:2])


def test_sd3_loss_weightings():
    x0, eps = torch.zeros(2, 1, 1, 1), torch.ones(2, 1, 1, 1)
    u = torch.tensor([0.25, 0.5])
    assert torch.equal(RectifiedFlow().at_levels(x0, eps, u).weights, torch.ones(2))
    sqrt = RectifiedFlow(loss_weighting="sigma_sqrt").at_levels(x0, eps, u).weights
    torch.testing.assert_close(sqrt, torch.tensor([16.0, 4.0]))
    cosmap = RectifiedFlow(loss_weighting="cosmap").at_levels(x0, eps, u).weights
    torch.testing.assert_close(cosmap[1], torch.tensor(2 / (math.pi * 0.5)))


def test_bad_settings_name_the_key():
    with pytest.raises(ValueError, match="model.objective.density='cosine'"):
        RectifiedFlow(density="cosine")
    with pytest.raises(ValueError, match="model.objective.loss_weighting"):
        RectifiedFlow(loss_weighting="snr")


def test_stratified_levels_deal_the_bins_round_robin():
    levels = stratified_levels(torch.arange(10), 4)
    assert levels.tolist() == [0.125, 0.375, 0.625, 0.875] * 2 + [0.125, 0.375]


def test_export_scheduler_keeps_the_training_shift():
    config = RectifiedFlow(shift=3.0).scheduler_config()
    assert config == {"num_train_timesteps": 1000, "shift": 3.0}
    dpm = RectifiedFlow(shift=3.0, scheduler_class="DPMSolverMultistepScheduler",
                        scheduler={"use_flow_sigmas": True, "flow_shift": 3.0})
    assert "shift" not in dpm.scheduler_config() and dpm.export_scheduler.startswith("DPM")
