"""The pure parts of scaling out: batch plans, learning-rate rules, per-sample draws, FLOPs."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor
from hydra.utils import instantiate
from lightning.fabric.utilities.throughput import measure_flops

from train.config.batching import plan_batch, plan_for, scaled_lr
from train.errors import ConfigError
from train.tasks.rng import SampleRNG, row_offset


@pytest.mark.parametrize(
    ("global_size", "world", "cap", "expected"),
    [
        (256, 8, None, (32, 1)),  # no cap: no accumulation
        (256, 8, 16, (16, 2)),
        (256, 8, 10, (8, 4)),  # 32 per rank: the fewest steps with micro-batches <= 10
        (8, 1, 4, (4, 2)),
        (6, 2, 2, (1, 3)),  # 3 per rank: 3 does not halve, so 3 steps of 1
    ],
)
def test_plan_splits_the_global_batch(global_size, world, cap, expected) -> None:
    plan = plan_batch(global_size, world, cap, data_batch_size=99, accumulation=1)
    assert (plan.per_device, plan.accumulation) == expected
    assert plan.per_device * plan.accumulation * world == global_size


def test_without_a_global_size_the_per_device_settings_stand() -> None:
    plan = plan_batch(None, world_size=4, max_per_device=None, data_batch_size=8, accumulation=3)
    assert (plan.global_size, plan.per_device, plan.accumulation) == (96, 8, 3)
    assert plan.describe() == "global batch 96 = 8 per device x 4 devices x 3 accumulation steps"


def test_a_global_batch_that_does_not_split_names_the_fix() -> None:
    with pytest.raises(ConfigError, match=r"global_size=30 .* over 8 devices.* e\.g\. 24 or 32"):
        plan_batch(30, 8, None, 4, 1)


CLIP = {"resolution": 64, "batch_size": 8, "video": {"num_frames": 9}}  # 36,864 frame pixels


@pytest.mark.parametrize(
    ("batch", "data", "world", "expected"),
    [
        # 8 clips a step per device, 2 fit: 4 accumulation steps keep the step's 8 clips.
        ({"max_pixels_per_device": 80_000}, CLIP, 1, (8, 2, 4)),
        # The same budget holds 19 images of 64 px: 8 fit in one micro-batch.
        ({"max_pixels_per_device": 80_000}, CLIP | {"video": None}, 1, (8, 8, 1)),
        # 16 over 2 devices: 8 per rank, 3 fit, so 4 steps of 2 (8 does not split in 3s).
        ({"global_size": 16, "max_pixels_per_device": 3 * 36_864}, CLIP, 2, (16, 2, 4)),
        # The tighter of the two caps wins.
        ({"global_size": 16, "max_per_device": 1, "max_pixels_per_device": 10**9}, CLIP, 2,
         (16, 1, 8)),
    ],
)
def test_micro_batches_are_planned_by_frames_times_pixels(batch, data, world, expected) -> None:
    plan = plan_for(batch, data, world, accumulation=1)
    assert (plan.global_size, plan.per_device, plan.accumulation) == expected
    if "max_pixels_per_device" in batch:
        assert plan.per_device * plan.sample_pixels <= batch["max_pixels_per_device"]


def test_the_plan_says_what_a_micro_batch_holds_of_its_budget() -> None:
    plan = plan_for({"max_pixels_per_device": 80_000}, CLIP, 1, accumulation=1)
    assert plan.describe() == (
        "global batch 8 = 2 per device x 1 devices x 4 accumulation steps (73,728 of "
        "batch.max_pixels_per_device=80,000 frame pixels per micro-batch)"
    )


def test_a_budget_below_one_clip_names_the_clip_and_the_settings() -> None:
    with pytest.raises(ConfigError, match=r"max_pixels_per_device=30,000 is below one sample's "
                       r"36,864 frame pixels \(9 frames x data.resolution=64.*num_frames"):
        plan_for({"max_pixels_per_device": 30_000}, CLIP, 1, accumulation=1)


def test_learning_rate_scaling_is_explicit() -> None:
    assert scaled_lr(1e-4, "none", 1024, None) == 1e-4
    assert scaled_lr(1e-4, "linear", 1024, 256) == pytest.approx(4e-4)
    assert scaled_lr(1e-4, "sqrt", 1024, 256) == pytest.approx(2e-4)
    with pytest.raises(ConfigError, match="needs batch.reference_size"):
        scaled_lr(1e-4, "linear", 1024, None)
    with pytest.raises(ConfigError, match="use none, linear or sqrt"):
        scaled_lr(1e-4, "cubic", 1024, 256)


def test_rows_of_the_global_batch_do_not_depend_on_the_split() -> None:
    # Global batch 8: one rank with 2 micro-batches of 4, or 2 ranks with 1 micro-batch each.
    one_rank = [row_offset(0, 1, a, 4) for a in (0, 1)]
    two_ranks = [row_offset(r, 2, 0, 4) for r in (0, 1)]
    assert one_rank == two_ranks == [0, 4]
    # 2 ranks x 2 micro-batches: micro-batch 0 of both ranks first, as the loader cuts data.
    assert [row_offset(r, 2, a, 2) for a in (0, 1) for r in (0, 1)] == [0, 2, 4, 6]


def test_a_samples_draws_depend_on_its_row_only() -> None:
    whole = SampleRNG.for_rows(seed=7, step=3, first_row=0, n=4, device="cpu")
    half = SampleRNG.for_rows(seed=7, step=3, first_row=2, n=2, device="cpu")
    assert torch.equal(whole.randn((3, 2))[2:], half.randn((3, 2)))
    assert torch.equal(whole.randint(1000)[2:], half.randint(1000))
    other_step = SampleRNG.for_rows(seed=7, step=4, first_row=0, n=4, device="cpu")
    assert not torch.equal(
        other_step.randn((3, 2)), SampleRNG.for_rows(7, 3, 0, 4, "cpu").randn((3, 2))
    )


def test_flops_counted_on_meta_equal_a_real_training_step(compose) -> None:
    cfg = compose("experiment=tiny")
    module = instantiate(cfg.model)
    unet = module.trainable
    c = unet.config.in_channels
    latent = (c, 4, 4)
    batch = {"key": ["a", "b", "c"], "caption": ["a red circle", "", "a blue square"],
             "pixel_values": torch.zeros(3, 3, 16, 16)}  # fmt: skip
    cond = module.batch_conditioning(batch, None)
    counted = module.backbone.train_flops(3, latent, cond)
    # PyTorch's FLOP counter misses CPU flash attention; the classic processor uses bmm.
    unet.set_attn_processor(AttnProcessor())
    x, t = torch.randn(3, *latent), torch.zeros(3, dtype=torch.long)
    real = measure_flops(
        unet, lambda: unet(x, t, encoder_hidden_states=cond.hidden).sample, torch.Tensor.sum
    )
    assert real == counted > 0

    module.diffusion_step(batch, SampleRNG.for_rows(0, 0, 0, 3, "cpu"))
    f = 2 ** (len(module.vae.config.block_out_channels) - 1)
    assert module.flops_per_batch == module.backbone.train_flops(3, (c, 16 // f, 16 // f), cond)
