"""A Lightning run that records which sample keys every training step consumed.

Run as a script (under torchrun for several ranks, or Lightning's DDP launcher, which
re-executes it once per extra rank). Each rank appends
``{"rank", "epoch", "step", "keys"}`` lines to ``OUT/keys-rank{R}.jsonl``, flushed per step so
the record survives a SIGKILL. ``--kill-at-step`` SIGKILLs the process at that step.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from data.datamodule import WebDatasetDataModule
from train.callbacks.data_health import DataHealthMonitor


class Recorder(L.LightningModule):
    def __init__(self, out: Path, kill_at_step: int | None) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.out, self.kill_at_step = out, kill_at_step

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if self.kill_at_step is not None and self.global_step == self.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
        record = {
            "rank": self.global_rank,
            "epoch": self.current_epoch,
            "step": self.global_step,
            "keys": list(batch["key"]),
        }
        with open(self.out / f"keys-rank{self.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        return self.layer(batch["pixel_values"].mean((2, 3))).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("urls")
    parser.add_argument("out", type=Path)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--shuffle-buffer", type=int, default=12)
    parser.add_argument("--ckpt-every", type=int, default=0)
    parser.add_argument("--kill-at-step", type=int, default=None)
    parser.add_argument("--resume", default=None)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    dm = WebDatasetDataModule(
        args.urls,
        tokenizer=None,
        resolution=16,
        batch_size=args.batch_size,
        num_workers=args.workers,
        shuffle_buffer=args.shuffle_buffer,
        seed=7,
    )
    callbacks: list[L.Callback] = [DataHealthMonitor(every_n_steps=4)]
    if args.ckpt_every:
        callbacks.append(
            ModelCheckpoint(
                dirpath=args.out / "ckpt", every_n_train_steps=args.ckpt_every, save_top_k=-1
            )
        )
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        logger=CSVLogger(args.out, name="csv", version=0),
        callbacks=callbacks,
        enable_checkpointing=bool(args.ckpt_every),
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Recorder(args.out, args.kill_at_step), datamodule=dm, ckpt_path=args.resume)
    if trainer.global_rank == 0:
        (args.out / "done.json").write_text(json.dumps({"global_step": trainer.global_step}))


if __name__ == "__main__":
    main()
