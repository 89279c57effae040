"""What `ldm-train` and `ldm-sample` print: each line once, no library noise, the end-of-run
figures, the step progress bar and the notes about captions and prompts cut to the text
encoder's length."""

from __future__ import annotations

import contextlib
import io
import math
import re
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger

from train.callbacks.console import MAX_LENGTH_KEY, CaptionTruncation, StepProgressBar
from train.cli.console import NOISE_WARNINGS, quiet_library_noise

# What the libraries printed in a tiny run before: Lightning's adverts, the FLOPs it cannot
# count, the scheduler config dumped as JSON, the torchvision fallback notes.
NOISE = ("💡 Tip", "litlogger", "Total FLOPs", "Total Flops", "_diffusers_version",
         "requires torchvision", "Loading weights", "Writing model shards")  # fmt: skip


def printed_lines(proc) -> list[str]:
    """Non-blank lines of stdout and stderr, without progress-bar redraws and timestamps."""
    lines = []
    for line in (proc.stdout + proc.stderr).splitlines():
        line = line.split("\r")[-1].strip()
        if line and "it/s]" not in line:
            lines.append(re.sub(r"^\[[\d\-: ,]+\]", "", line))  # Hydra's time prefix
    return lines


def test_ldm_train_prints_each_line_once_and_no_library_noise(tiny_run_output):
    lines = printed_lines(tiny_run_output)
    assert any("`Trainer.fit` stopped" in line for line in lines), lines
    assert not [n for n in NOISE if n in "\n".join(lines)]
    messages = [line.rsplit("INFO] - ", 1)[-1].removeprefix("INFO: ") for line in lines]
    repeated = {m for m in messages if messages.count(m) > 1 and not set(m) <= set("-| ")}
    # Lightning's notice where `srun` is installed (the suite's SLURM may be, depending on test
    # order) comes from two call sites in this in-process run; a subprocess prints it once.
    repeated = {m for m in repeated if "The `srun` command is available" not in m}
    assert not repeated, repeated


def test_summary_gives_steps_samples_rate_loss_and_wall_time(tiny_run, tiny_run_output):
    run_dir, cfg = tiny_run
    out = tiny_run_output.stdout
    steps = re.search(r"^Steps: (\d+) of max_steps=(\d+) \((\d+) samples, ([\d.]+) samples/s", out,
                      re.M)  # fmt: skip
    assert steps, out
    assert int(steps[1]) == int(steps[2]) == cfg.trainer.max_steps
    assert int(steps[3]) == cfg.trainer.max_steps * cfg.data.batch_size
    assert float(steps[4]) > 0
    loss = float(re.search(r"^Final train/loss: (\S+) \(last logged, step 4\)", out, re.M)[1])
    assert math.isfinite(loss)
    assert loss == pytest.approx(last_logged(cfg, run_dir, "train/loss"), rel=1e-5)
    assert re.search(r"^Wall time: [\d.]+ s$", out, re.M), out
    assert out.index("Steps:") < out.index("Run directory:")


def last_logged(cfg, run_dir: Path, key: str) -> float:
    from mlflow.tracking import MlflowClient

    from train.config.run_files import RUN_ID_FILE

    client = MlflowClient(tracking_uri=cfg.paths.mlflow_uri)
    history = client.get_metric_history((run_dir / RUN_ID_FILE).read_text().strip(), key)
    return max(history, key=lambda m: (m.step, m.timestamp)).value


def test_library_noise_warnings_are_silenced_and_others_kept():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_library_noise()
        for message, category in [
            ("The configuration file of this scheduler: DDIMScheduler {...}", FutureWarning),
            ("Total length of `list` across ranks is zero. Please make sure", UserWarning),
            ("Total length of `DataLoader` across ranks is zero.", UserWarning),
            ("train.foo is deprecated: use bar", FutureWarning),
        ]:
            warnings.warn(message, category, stacklevel=1)
    assert [str(w.message) for w in caught] == [
        "Total length of `DataLoader` across ranks is zero.",
        "train.foo is deprecated: use bar",
    ]
    assert len(NOISE_WARNINGS) == 3


class _Tiny(L.LightningModule):
    """Two batches per epoch, one of two captions cut in each."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.layer(batch["x"]).pow(2).mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=2)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        cut = torch.tensor([True, False])
        batch = {"x": torch.ones(2, 2), "key": ["a", "b"], "caption_truncated": cut}
        return torch.utils.data.DataLoader([batch] * 2, batch_size=None)  # the batches as they are


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """5 steps over 3 epochs of a tiny module with the step bar and the caption count."""
    root = tmp_path_factory.mktemp("console_fit")
    bar, cut = StepProgressBar(refresh_rate=1), CaptionTruncation(every_n_steps=2)
    trainer = L.Trainer(accelerator="cpu", max_steps=5, max_epochs=-1, callbacks=[bar, cut],
                        logger=CSVLogger(root), enable_checkpointing=False,
                        enable_model_summary=False, log_every_n_steps=1)  # fmt: skip
    module = _Tiny()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        trainer.fit(module)
    return trainer, module, bar, out.getvalue(), Path(trainer.logger.log_dir)


def test_progress_bar_counts_steps_of_max_steps_without_v_num(fitted):
    trainer, module, bar, out, _ = fitted
    assert trainer.current_epoch >= 2  # one bar across the epochs
    progress = bar.train_progress_bar
    assert (progress.desc, progress.n, progress.total) == ("step", 5, 5)
    metrics = bar.get_metrics(trainer, module)
    assert "v_num" not in metrics and "train/loss" in metrics
    assert "v_num" in TQDMProgressBar.get_metrics(bar, trainer, module)  # Lightning's own has it
    assert "step: 100%" in out and "5/5" in out and "Epoch" not in out


def test_cut_captions_are_counted_logged_and_said_once(fitted):
    _, _, _, out, log_dir = fitted
    rows = (log_dir / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    col = header.index("data/captions_truncated")
    values = [float(r.split(",")[col]) for r in rows[1:] if r.split(",")[col]]
    assert values[-1] == 5.0  # one per step, summed over the run
    notes = [line for line in out.splitlines() if "data/captions_truncated" in line]
    assert len(notes) == 1 and MAX_LENGTH_KEY in notes[0], out


def test_collate_marks_captions_longer_than_the_text_encoder_reads(compose):
    from hydra.utils import instantiate

    from data.transforms import Collate, SkipCounter

    tokenizer = instantiate(compose("experiment=tiny").model.conditioner.tokenizer)
    assert tokenizer.model_max_length == 24
    captions = ["a red circle on a white background", " ".join(["a red circle"] * 10)]
    samples = [{"key": str(i), "caption": c} for i, c in enumerate(captions)]
    batch = Collate(tokenizer)(samples, SkipCounter(1.0, "test"))
    assert batch["caption_truncated"].tolist() == [False, True]
    assert batch["input_ids"].shape == (2, 24)
