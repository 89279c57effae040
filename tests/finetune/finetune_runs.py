"""The overrides of the fine-tuning tests' tiny runs: 4 steps at 16 px from the session's tiny
base export, big steps so that what trains moves far from its initialisation."""

from __future__ import annotations

from pathlib import Path


def finetune_overrides(
    experiment: str, root: Path, base: Path, shards: Path, *extra: str, logger: str = "none"
) -> list[str]:
    return [
        f"paths.root={root}",
        f"experiment={experiment}",
        f"model.base={base}",
        f"data.urls={shards}",
        f"logger={logger}",
        "data.resolution=16",
        "data.batch_size=4",
        "data.num_workers=0",
        "data.shuffle_buffer=16",
        "trainer.max_steps=4",
        "trainer.val_check_interval=1000",
        "trainer.enable_progress_bar=false",
        "model.optimizer.lr=1e-2",  # big steps: trained weights are far from their init
        "model.lr_scheduler.num_warmup_steps=0",
        "callbacks.checkpoint.every_n_train_steps=2",
        "callbacks.samples.every_n_steps=0",
        "callbacks.samples.num_inference_steps=2",
        "callbacks.progress=null",
        *extra,
    ]
