"""ControlNet and inpainting runs under two CPU processes (gloo), on the sharding strategies:
FSDP, FSDP2 and ZeRO-3 shard the trained model (the ControlNet; the widened UNet) while the
frozen base stays whole outside it. The exported model equals the one one process trains on
the same global batch (1e-6): gathered whole, never one rank's shard."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from launch import SGD, TORCHRUN, ldm_train
from safetensors.torch import load_file

# mode: (its experiment's overrides, the trained model's file in the export)
MODES = {
    "controlnet": (("experiment=controlnet", "data/control=mask",
                    "model.backbone.conditioning_embedding_out_channels=[8,16]"),
                   "export/controlnet/diffusion_pytorch_model.safetensors"),
    "inpaint": (("experiment=inpaint", "model.backbone.masked_loss=true"),
                "export/unet/diffusion_pytorch_model.safetensors"),
}  # fmt: skip


def run_args(mode: str, base: Path, shards: Path) -> list[str]:
    return [*MODES[mode][0],
        f"model.base={base}", f"data.urls={shards}", "logger=none",
        "data.resolution=16", "data.num_workers=0", "data.shuffle_buffer=16",
        "batch.global_size=8", "trainer.max_steps=3", "trainer.val_check_interval=1000",
        "trainer.enable_progress_bar=false", "model.lr_scheduler.num_warmup_steps=0",
        "callbacks.checkpoint.every_n_train_steps=0", "callbacks.samples.every_n_steps=0",
        "callbacks.samples.num_inference_steps=2", "callbacks.progress=null",
        *SGD, "run_name=r",
    ]  # fmt: skip


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "strategy"),
                         [("controlnet", "fsdp"), ("controlnet", "fsdp2"),
                          ("inpaint", "deepspeed_zero3")])  # fmt: skip
def test_two_sharded_processes_export_what_one_process_trains(
    mode, strategy, tiny_run, demo_shards, tmp_path
) -> None:
    base = tiny_run[0] / "export"
    args = run_args(mode, base, demo_shards)
    # One process, the same global batch of 8: two micro-batches of 4 read by two loader
    # workers, which cut the sample stream like two ranks with one reader each.
    ldm_train(tmp_path / "one", *args, "trainer.devices=1", "data.num_workers=2",
              "batch.max_per_device=4")  # fmt: skip
    ldm_train(tmp_path / "two", *args, "trainer.devices=2", f"strategy={strategy}",
              launcher=TORCHRUN)  # fmt: skip
    file = MODES[mode][1]
    one, two = (load_file(tmp_path / r / "runs" / "r" / file) for r in ("one", "two"))
    if mode == "inpaint":  # the 9-channel UNet trained (its widened conv_in and the rest)
        before = load_file(base / file.removeprefix("export/"))
        assert one["conv_in.weight"].shape[1] == 9
        assert max_diff({k: one[k] for k in before if k != "conv_in.weight"},
                        {k: before[k] for k in before if k != "conv_in.weight"}) > 1e-4  # fmt: skip
    else:  # the ControlNet's zero-initialised output convolutions trained off zero
        zero_convs = [v for k, v in one.items() if k.startswith("controlnet_down_blocks.")]
        assert zero_convs and all(v.abs().max() > 0 for v in zero_convs)
    assert max_diff(two, one) < 1e-6
