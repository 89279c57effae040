import math

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from train.objectives import ddpm as diffusion
from train.objectives.base import weighted_mse
from train.objectives.vae import kl_divergence


def scheduler(prediction_type="v_prediction"):
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction_type,
        clip_sample=False,
    )


def test_noising_and_v_target_match_their_formulas():
    s = scheduler()
    x0, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([0, 500, 999])
    a = s.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = diffusion.noisy_latents(s, x0, eps, t)
    torch.testing.assert_close(x_t, a.sqrt() * x0 + (1 - a).sqrt() * eps)
    v = diffusion.training_target(s, x0, eps, t)
    torch.testing.assert_close(v, a.sqrt() * eps - (1 - a).sqrt() * x0)
    # v and x_t together recover x0: x0 = sqrt(a) x_t - sqrt(1-a) v
    torch.testing.assert_close(a.sqrt() * x_t - (1 - a).sqrt() * v, x0, atol=1e-5, rtol=1e-5)


def test_epsilon_target_is_the_noise_and_unknown_types_fail():
    eps = torch.randn(2, 4, 2, 2)
    t = torch.tensor([1, 2])
    assert torch.equal(diffusion.training_target(scheduler("epsilon"), eps * 0, eps, t), eps)
    with pytest.raises(ValueError, match="prediction_type='sample'"):
        diffusion.training_target(scheduler("sample"), eps, eps, t)


def test_min_snr_weights():
    s = scheduler("epsilon")
    t = torch.tensor([0, 999])
    snr = compute_snr(s, t)
    a = s.alphas_cumprod[t]
    torch.testing.assert_close(snr, a / (1 - a))  # diffusers' SNR is a / (1 - a)
    w = diffusion.min_snr_weights(s, t, gamma=5.0)
    assert snr[0] > 5 > snr[1]
    assert math.isclose(float(w[0]), 5.0 / float(snr[0]), rel_tol=1e-5)
    assert math.isclose(float(w[1]), 1.0, rel_tol=1e-5)
    wv = diffusion.min_snr_weights(scheduler(), t, gamma=5.0)
    assert math.isclose(float(wv[1]), float(snr[1] / (snr[1] + 1)), rel_tol=1e-5)
    assert torch.equal(diffusion.min_snr_weights(s, t, None), torch.ones(2))


def test_kl_is_zero_for_standard_normal_and_positive_otherwise():
    mean, logvar = torch.zeros(2, 4, 3, 3), torch.zeros(2, 4, 3, 3)
    assert torch.equal(kl_divergence(mean, logvar), torch.zeros(2))
    kl = kl_divergence(mean + 1.0, logvar)
    torch.testing.assert_close(kl, torch.full((2,), 0.5 * 36))


def test_weighted_loss():
    pred, target = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    assert float(weighted_mse(pred, target, torch.tensor([1.0, 3.0]))) == 2.0


class Draws:
    """Seeded draws with SampleRNG's interface, one generator per sample."""

    def __init__(self, n: int, seed: int = 0) -> None:
        from train.tasks.rng import SampleRNG

        self.rng = SampleRNG.for_rows(seed, 0, 0, n, "cpu")
        self.generators, self.device = self.rng.generators, self.rng.device

    def randn(self, shape, dtype=torch.float32):
        return self.rng.randn(shape, dtype)

    def rand(self):
        return self.rng.rand()

    def randint(self, high):
        return self.rng.randint(high)


def test_ddpm_objective_draws_from_its_generators_and_offset_noise_shifts_channels():
    x0 = torch.randn(4, 4, 2, 2)
    plain = diffusion.DDPM(scheduler()).draw(x0, Draws(4))
    again = diffusion.DDPM(scheduler()).draw(x0, Draws(4))
    assert torch.equal(plain.x_t, again.x_t) and torch.equal(plain.timesteps, again.timesteps)
    offset = diffusion.DDPM(scheduler(), offset_noise=0.1).draw(x0, Draws(4))
    assert torch.equal(offset.timesteps, plain.timesteps)  # the extra draw comes after
    assert not torch.equal(offset.x_t, plain.x_t)
    noise = torch.zeros(2, 3, 2, 2)
    shifted = diffusion.offset_noise(noise, torch.ones(2, 3, 1, 1), 0.1)
    assert torch.allclose(shifted, torch.full_like(noise, 0.1))


def test_ddpm_fixed_levels_and_zero_terminal_snr():
    s = scheduler()
    u = torch.tensor([0.0625, 0.9375])
    noised = diffusion.DDPM(s).at_levels(torch.zeros(2, 4, 2, 2), torch.ones(2, 4, 2, 2), u)
    assert noised.timesteps.tolist() == [62, 937]
    zero = DDPMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        rescale_betas_zero_snr=True,
        prediction_type="v_prediction",
    )
    assert float(zero.alphas_cumprod[-1]) < 1e-6 < float(s.alphas_cumprod[-1])


def test_a_flow_base_scheduler_is_refused_naming_the_flow_objective(tmp_path):
    """A flow-trained export's scheduler/ (DPM++ with flow sigmas) loads as a DDPMScheduler:
    the DDPM objective refuses it when built, not at the first training step."""
    from diffusers import DPMSolverMultistepScheduler

    DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                flow_shift=3.0).save_pretrained(tmp_path)  # fmt: skip
    scheduler = DDPMScheduler.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="trained by rectified flow; use model/objective="
                       "flow_pretrained"):  # fmt: skip
        diffusion.DDPM(scheduler)
    diffusion.DDPM(DDPMScheduler())  # an epsilon schedule is taken
