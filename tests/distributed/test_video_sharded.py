"""Video models under two CPU processes (gloo): DDP, DeepSpeed ZeRO-2 and FSDP train the
AnimateDiff motion modules over the frozen image UNet, and FSDP (one unit per transformer block)
the Wan video DiT, to the export one process trains on the same global batch of clips (1e-6),
the one process splitting it by a frame-pixel budget or a sample cap."""

from __future__ import annotations

import pytest
from launch import SGD, TORCHRUN, ldm_train
from safetensors.torch import load_file

FILE = "export/unet/diffusion_pytorch_model.safetensors"


def run_args(shards, experiment: str = "motion_tiny") -> list[str]:
    return [f"experiment={experiment}", f"data.urls={shards}", "logger=none",
        "batch.global_size=4", "trainer.max_steps=3", "model.lr_scheduler.num_warmup_steps=0",
        "callbacks.checkpoint.every_n_train_steps=0", *SGD, "run_name=r"]  # fmt: skip


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, motion_shards):
    # Two micro-batches of 2 read by two loader workers cut the clip stream as two ranks do.
    # The split is planned from a frame-pixel budget: 3000 holds two clips of 5 x 16 x 16.
    root = tmp_path_factory.mktemp("one")
    proc = ldm_train(root, *run_args(motion_shards), "trainer.devices=1", "data.num_workers=2",
                     "batch.max_pixels_per_device=3000")  # fmt: skip
    assert "global batch 4 = 2 per device x 1 devices x 2 accumulation steps (2,560 of " \
        "batch.max_pixels_per_device=3,000 frame pixels per micro-batch)" in proc.stdout
    return load_file(root / "runs" / "r" / FILE)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "deepspeed_zero2", "fsdp"])
def test_two_processes_export_what_one_process_trains(
    strategy, one_process, motion_shards, tmp_path
) -> None:
    ldm_train(tmp_path, *run_args(motion_shards), "trainer.devices=2", f"strategy={strategy}",
              launcher=TORCHRUN)  # fmt: skip
    two = load_file(tmp_path / "runs" / "r" / FILE)
    assert two.keys() == one_process.keys()
    motion = [k for k in two if "motion_modules" in k]
    assert motion and len(motion) < len(two)
    # The motion modules' output projections start at zero: they trained.
    assert min(two[k].abs().max().item() for k in motion if "proj_out.weight" in k) > 0
    diff = max((two[k] - one_process[k]).abs().max().item() for k in two)
    assert diff < 1e-6, f"{strategy}: {diff}"


WAN_FILE = "export/transformer/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def wan_shards(tmp_path_factory):
    """16 moving-shapes clips of 5 frames (4k+1) at 32 px."""
    from data.shards_video import write_motion_demo_shards

    out = tmp_path_factory.mktemp("wan_shapes")
    write_motion_demo_shards(out, num_samples=16, samples_per_shard=8, size=32, frames=5, seed=2)
    return out


@pytest.mark.slow
def test_fsdp_trains_the_wan_transformer_as_one_process_does(wan_shards, tmp_path) -> None:
    args = run_args(wan_shards, "wan_tiny")
    one = tmp_path / "one"
    ldm_train(one, *args, "trainer.devices=1", "data.num_workers=2", "batch.max_per_device=2")
    two = tmp_path / "two"
    ldm_train(two, *args, "trainer.devices=2", "strategy=fsdp", launcher=TORCHRUN)
    a, b = (load_file(root / "runs" / "r" / WAN_FILE) for root in (one, two))
    assert a.keys() == b.keys() and len(a) > 10
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff < 1e-6, diff
