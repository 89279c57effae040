"""A LoRA over a frozen base under two CPU processes (gloo): ZeRO-3 and FSDP shard the base and
the adapter, DDP and ZeRO-2 keep both whole (and train a text-encoder LoRA beside the UNet's,
which the sharding strategies refuse). Under each, the run trains, resumes exactly from its
mid-run (sharded) checkpoint, which holds the adapter only, and writes the LoRA files one
process writes: gathered whole, never empty, never one rank's shard."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from launch import SGD, TORCHRUN, ldm_export, ldm_train
from safetensors.torch import load_file

from train.distributed.sharding import load_any_checkpoint

LORA = "lora/pytorch_lora_weights.safetensors"
KOHYA = "lora_kohya/lora.safetensors"
MERGED = "export/unet/diffusion_pytorch_model.safetensors"
TEXT_MERGED = "export/text_encoder/model.safetensors"
# The session's base encodes with MiniLM (a BERT): its attention projections.
TEXT_LORA = (
    "model/conditioner/adapter=lora",
    "model.conditioner.adapter.target_modules=[query,value]",
)


def lora_args(base: Path, shards: Path, text: bool = False) -> list[str]:
    return [*(TEXT_LORA if text else ()),
        "experiment=lora", f"model.base={base}", f"data.urls={shards}", "logger=none",
        "data.resolution=16", "data.num_workers=0", "data.shuffle_buffer=16",
        "batch.global_size=8", "trainer.max_steps=4", "trainer.val_check_interval=1000",
        "trainer.enable_progress_bar=false", "model.lr_scheduler.num_warmup_steps=0",
        "callbacks.checkpoint.every_n_train_steps=2", "callbacks.samples.every_n_steps=0",
        "callbacks.samples.num_inference_steps=2", "callbacks.progress=null",
        "model.backbone.adapter.r=4", "model.backbone.adapter.lora_alpha=8",  # alpha != rank
        *SGD, "callbacks/ema=default", "callbacks.ema.decay=0.5", "run_name=r",
    ]  # fmt: skip


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def one_process_run(base: Path, shards: Path, root: Path, text: bool) -> Path:
    """The same global batch of 8 on one process: two micro-batches of 4 read by two loader
    workers, which cut the sample stream like two ranks with one reader each."""
    ldm_train(root, *lora_args(base, shards, text), "trainer.devices=1", "data.num_workers=2",
              "batch.max_per_device=4")  # fmt: skip
    run = root / "runs" / "r"
    # The EMA adapter and the raw one differ, so a comparison below can tell them apart.
    ldm_export("--no-ema", "--format", "diffusers-lora", str(run / "checkpoints/last.ckpt"),
               str(run / "raw"))  # fmt: skip
    assert max_diff(load_file(run / LORA), load_file(run / "raw" / LORA.split("/")[1])) > 1e-3
    return run


@pytest.fixture(scope="module")
def one_process(tiny_run, demo_shards, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lora-one")
    return one_process_run(tiny_run[0] / "export", demo_shards, root, text=False)


@pytest.fixture(scope="module")
def one_process_text(tiny_run, demo_shards, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lora-text-one")
    run = one_process_run(tiny_run[0] / "export", demo_shards, root, text=True)
    assert any(k.startswith("text_encoder.") for k in load_file(run / LORA))
    return run


@pytest.mark.slow
@pytest.mark.parametrize(
    ("strategy", "text"),
    [("ddp", True), ("deepspeed_zero2", True), ("deepspeed_zero3", False), ("fsdp", False),
     ("fsdp2", False)],
)
def test_a_lora_trains_resumes_and_exports_under_two_processes_like_one(
    strategy, text, request, tiny_run, demo_shards, tmp_path
) -> None:
    one_process = request.getfixturevalue("one_process_text" if text else "one_process")
    args = [*lora_args(tiny_run[0] / "export", demo_shards, text), "trainer.devices=2",
            f"strategy={strategy}"]  # fmt: skip
    # A BERT encoder's LoRA has no kohya form (its keys are CLIP's): no kohya file is written.
    files = (LORA, MERGED, TEXT_MERGED) if text else (LORA, KOHYA, MERGED)
    ldm_train(tmp_path / "a", *args, launcher=TORCHRUN)
    first = tmp_path / "a" / "runs" / "r"
    step2 = first / "checkpoints" / "step_0000002.ckpt"
    # Resumed in another folder from the mid-run checkpoint, as a preempted job restarts.
    ldm_train(tmp_path / "b", *args, f"ckpt_path={step2}", launcher=TORCHRUN)
    resumed = tmp_path / "b" / "runs" / "r"
    for run in (first, resumed):
        assert (run / KOHYA).exists() != text
        for file in files:
            diff = max_diff(load_file(run / file), load_file(one_process / file))
            assert diff < 1e-6, (run.parent.parent.name, file, diff)

    # The checkpoint holds the adapter alone (the base comes from model.base), whole.
    reference = torch.load(one_process / "checkpoints/last.ckpt", weights_only=True)
    saved = load_any_checkpoint(first / "checkpoints/last.ckpt", allow_pickle=True)
    assert saved["state_dict"].keys() == reference["state_dict"].keys()
    assert all(k.count("lora_") == 1 for k in saved["state_dict"])
    assert max_diff(saved["state_dict"], reference["state_dict"]) < 1e-6
    # ldm-export reads the (sharded) checkpoint to the same LoRA file.
    out = first / "offline"
    ldm_export("--allow-pickle", "--format", "diffusers-lora",
               str(first / "checkpoints/last.ckpt"), str(out))  # fmt: skip
    assert max_diff(load_file(out / "pytorch_lora_weights.safetensors"),
                    load_file(one_process / LORA)) < 1e-6  # fmt: skip
