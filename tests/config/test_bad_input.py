"""Bad input through the real entry points: a shard pattern that matches nothing fails before any
model is built, bad samples are skipped and counted in MLflow, a bad CLI value exits with 2."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from diffusers import AutoencoderKL, UNet2DConditionModel
from hydra.errors import InstantiationException
from mlflow.tracking import MlflowClient
from transformers import AutoModel

from data.shapes import render, train_specs
from data.shards import jpeg_bytes, write_shards
from train.cli.run import RUN_ID_FILE, run
from train.tasks.latent_diffusion import LatentDiffusion


def test_pattern_matching_nothing_fails_before_any_model_is_built(compose, tmp_path, monkeypatch):
    def tripwire(*args, **kwargs):
        raise AssertionError("a model was built before the shard pattern was checked")

    # A signature cache of its own: the tripwires' (*args, **kwargs) must not be cached as the
    # classes' signatures for the tests after this one.
    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(LatentDiffusion, "__init__", tripwire)
    monkeypatch.setattr(UNet2DConditionModel, "__init__", tripwire)
    monkeypatch.setattr(AutoencoderKL, "__init__", tripwire)
    monkeypatch.setattr(AutoModel, "from_pretrained", tripwire)  # the MiniLM text encoder
    pattern = str(tmp_path / "nothing-{000..003}.tar")
    cfg = compose("experiment=tiny", f"data.urls='{pattern}'", "logger=none")
    with pytest.raises(InstantiationException, match=re.escape(pattern)) as err:
        run(cfg)
    # Hydra wraps what the data module's constructor raised; the cause names the pattern too.
    assert isinstance(err.value.__cause__, FileNotFoundError)
    assert pattern in str(err.value.__cause__) and "matched no shard files" in str(err.value)
    assert not (Path(cfg.paths.run_dir) / "checkpoints").exists()


def good_sample(i: int) -> dict:
    spec = train_specs()[i]
    image = render(spec, 16, np.random.default_rng(i))
    return {"__key__": f"{i:09d}", "jpg": jpeg_bytes(image), "txt": spec.caption}


def test_corrupt_and_uncaptioned_samples_are_skipped_and_counted(compose, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    good = [good_sample(i) for i in range(24)]  # 6 full batches of 4; the run uses 4 (+1 ahead)
    # Early, so they are counted with the first batch: counts travel with the batches, and skips
    # after the last batch a run consumes are never reported.
    corrupt = {"__key__": "corrupt", "jpg": good[0]["jpg"][:60], "txt": "a truncated jpeg"}
    uncaptioned = {"__key__": "uncaptioned", "jpg": good[1]["jpg"]}
    samples = [good[0], corrupt, uncaptioned, *good[1:]]
    shards = write_shards(samples, str(tmp_path / "bad-%06d.tar"), maxcount=100)
    assert len(shards) == 1

    cfg = compose(
        "experiment=tiny",
        f"data.urls={shards[0]}",
        "data.shuffle_buffer=0",  # keep the bad samples in the first batch
        "callbacks.samples=null",
        "callbacks.export=null",
    )
    run(cfg)

    client = MlflowClient(tracking_uri=cfg.logger.mlflow.tracking_uri)
    run_id = (Path(cfg.paths.run_dir) / RUN_ID_FILE).read_text().strip()
    assert client.get_run(run_id).info.status == "FINISHED"
    loss_steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert sorted(loss_steps) == list(range(cfg.trainer.max_steps))  # trained to the end
    totals = {
        reason: [m.value for m in client.get_metric_history(run_id, f"data/skipped_{reason}")]
        for reason in ("decode_error", "missing_caption", "missing_image", "too_large")
    }
    assert totals["decode_error"] and max(totals["decode_error"]) == 1.0
    assert totals["missing_caption"] and max(totals["missing_caption"]) == 1.0
    assert totals["decode_error"][-1] == totals["missing_caption"][-1] == 1.0
    assert max(totals["missing_image"]) == max(totals["too_large"]) == 0.0


def ldm_train_command() -> list[str]:
    script = Path(sys.executable).with_name("ldm-train")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from train.cli.train import main; sys.exit(main())"]


def test_cli_bad_value_exits_2_and_names_the_key(tmp_path, demo_shards):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LDM_OUTPUT_DIR": str(tmp_path)}
    start = time.monotonic()
    proc = subprocess.run(
        [*ldm_train_command(), "experiment=tiny", f"data.urls={demo_shards}",
         "trainer.max_steps=abc"],  # fmt: skip
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "trainer.max_steps" in proc.stderr
    assert "Config error:" in proc.stderr and "expects int" in proc.stderr
    assert elapsed < 15, f"a config error took {elapsed:.1f} s to report"
    assert not list(tmp_path.rglob("*.ckpt"))
