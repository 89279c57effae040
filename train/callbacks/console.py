"""Callbacks for what a user reads during and after a run: the progress bar, the model summary,
the end-of-run figures and the note about captions cut to the text encoder's length."""

from __future__ import annotations

import logging
import sys
import time
from datetime import timedelta
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelSummary, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.utilities.model_summary.model_summary import _format_summary_table

# The config key that sets how many tokens of a caption or prompt the text encoder reads.
MAX_LENGTH_KEY = "model.conditioner.tokenizer.model_max_length"

log = logging.getLogger("lightning.pytorch.callbacks.model_summary")  # where Lightning logs it


def step_based(trainer: L.Trainer) -> bool:
    """A run bounded by max_steps only (max_epochs -1 or unset), as every config here is."""
    return trainer.max_steps > 0 and trainer.max_epochs in (None, -1)


class StepProgressBar(TQDMProgressBar):
    """Lightning's bar without `v_num` (the logger's version: an MLflow run id cut to 2 chars)
    and, in a step-based run, one bar `step: N/max_steps` over the whole run instead of one per
    epoch of an endless, unsized stream (`Epoch 2`, `?it/s`)."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items

    def init_train_tqdm(self) -> Tqdm:
        trainer = self.trainer
        if not step_based(trainer):
            return super().init_train_tqdm()
        return Tqdm(
            desc="step",
            total=trainer.max_steps,
            initial=trainer.global_step,  # a resumed run starts where it left off
            position=2 * self.process_position,
            disable=self.is_disabled,
            leave=True,
            dynamic_ncols=True,
            file=sys.stdout,
            smoothing=0,
            bar_format=self.BAR_FORMAT,
        )

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if not step_based(trainer):  # a step-based run keeps its one bar across epochs
            super().on_train_epoch_start(trainer, *args)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:  # fmt: skip
        if not step_based(trainer):
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        bar, step = self.train_progress_bar, trainer.global_step
        if bar is not None and self._should_update(step, trainer.max_steps) and bar.n != step:
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar


class CompactModelSummary(ModelSummary):
    """Lightning's model summary as plain text in the log, without the FLOPs column and total:
    Lightning counts FLOPs only for a module with an `example_input_array`, and printed 0."""

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        if not total_flops:
            summary_data = [column for column in summary_data if column[0] != "FLOPs"]
        # Lightning's own formatter (what ModelSummary.summarize calls); no public function
        # formats already-summarized columns, and ModelSummary's str() would summarize again.
        table = _format_summary_table(total_parameters, trainable_parameters, model_size,
                                      total_training_modes, total_flops, *summary_data)  # fmt: skip
        if not total_flops:
            table = "\n".join(ln for ln in table.splitlines() if not ln.endswith("Total Flops"))
        log.info("\n" + table)


class RunReport(L.Callback):
    """Times the run and counts the samples trained on, for the end-of-run summary."""

    def __init__(self) -> None:
        self.samples = 0
        self.first_step = 0
        # Built with the run's other callbacks: the wall time covers building the model and
        # data, training, checkpoints and the export (not the imports before).
        self._start = self._train_start = self._train_end = time.monotonic()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.samples, self.first_step = 0, trainer.global_step  # a resume starts past 0
        self._train_start = self._train_end = time.monotonic()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:  # fmt: skip
        # Every rank trains on micro-batches of the same size (the batch plan).
        self.samples += len(batch["key"]) * trainer.world_size if "key" in batch else 0
        self._train_end = time.monotonic()

    def lines(self, trainer: L.Trainer) -> list[str]:
        steps = trainer.global_step
        run = f"{steps - self.first_step} in this run, " if self.first_step else ""
        train_s = max(self._train_end - self._train_start, 1e-9)
        rate = self.samples / train_s
        out = [f"Steps: {steps} of max_steps={trainer.max_steps} ({run}{self.samples} samples, "
               f"{rate:.1f} samples/s over {train_s:.1f} s of training)"]  # fmt: skip
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            out.append(f"Final train/loss: {float(loss):.6g} (last logged, step {steps})")
        out.append(f"Wall time: {duration(time.monotonic() - self._start)}")
        return out


def duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 60 else f"{timedelta(seconds=round(seconds))} (h:mm:ss)"


def run_report(trainer: L.Trainer) -> list[str]:
    """The RunReport callback's lines, or none when the run has no such callback."""
    return next((cb.lines(trainer) for cb in trainer.callbacks if isinstance(cb, RunReport)), [])


class CaptionTruncation(L.Callback):
    """Captions longer than the text encoder reads are cut (data.transforms.Collate marks them
    in `batch["caption_truncated"]`). Logs the total over all ranks as
    `data/captions_truncated`, and says so once, naming the setting, when the first is cut."""

    def __init__(self, every_n_steps: int = 50) -> None:
        self.every_n_steps = max(1, every_n_steps)
        self.local = 0  # this rank's count (rank 0's includes the total of a resumed run)
        self.total = 0  # over all ranks, as of the last report
        self._reported_step = -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:  # fmt: skip
        cut = batch.get("caption_truncated") if isinstance(batch, dict) else None
        self.local += int(cut.sum()) if cut is not None else 0
        step = trainer.global_step
        # Every rank reaches the same steps, so the reduce below never waits on a rank.
        if step % self.every_n_steps == 0 and step != self._reported_step:
            self._report(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self._reported_step:
            self._report(trainer, pl_module)

    def _report(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reported_step = trainer.global_step
        local = torch.tensor(float(self.local), device=pl_module.device)
        total = int(trainer.strategy.reduce(local, reduce_op="sum").item())
        first, self.total = self.total == 0 and total > 0, total
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.log_metrics({"data/captions_truncated": float(total)}, step=trainer.global_step)
        if first:
            encoder = getattr(pl_module, "conditioner", None)
            limit = getattr(encoder, "max_length", None)
            reads = f"the {limit} tokens the text encoder reads" if limit else "the text encoder"
            note = (
                f"{total} caption(s) so far longer than {reads}, cut to them "
                f"({MAX_LENGTH_KEY}); counted in the metric data/captions_truncated"
            )
            bar = trainer.progress_bar_callback
            if isinstance(bar, TQDMProgressBar):
                bar.print(note)  # above the bar, not through it
            else:
                print(note, flush=True)

    def state_dict(self) -> dict[str, Any]:
        return {"total": self.total}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Rank 0 carries the resumed total; the others count from 0, so the sum stays right.
        self.total = int(state_dict.get("total", 0))
        self.local = self.total if _global_rank() == 0 else 0


def _global_rank() -> int:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0))
