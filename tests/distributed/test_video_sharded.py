"""The AnimateDiff family under two CPU processes (gloo): DDP and DeepSpeed ZeRO-2 train the
motion modules over the frozen image UNet to the export one process trains on the same global
batch of clips (1e-6)."""

from __future__ import annotations

import pytest
from launch import SGD, TORCHRUN, ldm_train
from safetensors.torch import load_file

FILE = "export/unet/diffusion_pytorch_model.safetensors"


def run_args(shards) -> list[str]:
    return ["experiment=motion_tiny", f"data.urls={shards}", "logger=none",
        "batch.global_size=4", "trainer.max_steps=3", "model.lr_scheduler.num_warmup_steps=0",
        "callbacks.checkpoint.every_n_train_steps=0", *SGD, "run_name=r"]  # fmt: skip


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, motion_shards):
    # Two micro-batches of 2 read by two loader workers cut the clip stream as two ranks do.
    root = tmp_path_factory.mktemp("one")
    ldm_train(root, *run_args(motion_shards), "trainer.devices=1", "data.num_workers=2",
              "batch.max_per_device=2")  # fmt: skip
    return load_file(root / "runs" / "r" / FILE)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "deepspeed_zero2"])
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
