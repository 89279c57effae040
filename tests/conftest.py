"""Shared fixtures: shards written by the tests, the offline tokenizer, Hydra composition."""

from __future__ import annotations

import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tests' own signature cache (train/config/signatures.py), not the user's.
os.environ.setdefault("LDM_CACHE_DIR", tempfile.mkdtemp(prefix="ldm-test-cache-"))


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> Path:
    """A small shapes set (64 samples of 32 px in 2 shards)."""
    from data.shards import write_demo_shards

    out = tmp_path_factory.mktemp("shapes")
    write_demo_shards(out, num_samples=64, samples_per_shard=32, size=32, seed=1)
    return out


@pytest.fixture(scope="session")
def motion_shards(tmp_path_factory) -> Path:
    """A small moving-shapes set (32 clips of 5 frames at 16 px, H.264 mp4, in 2 shards)."""
    from data.shards_video import write_motion_demo_shards

    out = tmp_path_factory.mktemp("moving_shapes")
    write_motion_demo_shards(out, num_samples=32, samples_per_shard=16, size=16, frames=5, seed=1)
    return out


@pytest.fixture(scope="session")
def _tiny_run(tmp_path_factory, demo_shards):
    """`ldm-train` in the test process, as a user runs it (so its console output can be read):
    (run_dir, cfg, the CompletedProcess)."""
    from cli_runner import run_cli

    from train.cli.train import main
    from train.config.compose import compose

    root = tmp_path_factory.mktemp("tiny_run")
    overrides = [f"paths.root={root}", "experiment=tiny", f"data.urls={demo_shards}"]
    cfg = compose(overrides)
    # Its own MLflow store, under root.
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = run_cli(main, ["ldm-train", *overrides], env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return Path(cfg.paths.run_dir), cfg, proc


@pytest.fixture(scope="session")
def tiny_run(_tiny_run):
    """One tiny `experiment=tiny` run (4 steps, MLflow store under its root) for the session:
    its checkpoints, export and MLflow run are read by the training, export and sampling tests.
    Tests that change a run (resume) work on a copy. Returns (run_dir, cfg)."""
    return _tiny_run[:2]


@pytest.fixture(scope="session")
def tiny_run_output(_tiny_run):
    """What the session's tiny `ldm-train` run printed (CompletedProcess: stdout, stderr)."""
    return _tiny_run[2]


@pytest.fixture(scope="session")
def tokenizer():
    """The offline MiniLM WordPiece tokenizer, 32 tokens."""
    import transformers

    from train.models.conditioners.text import minilm_dir

    tok = transformers.AutoTokenizer.from_pretrained(minilm_dir())
    tok.model_max_length = 32
    return tok


@pytest.fixture
def compose(tmp_path) -> Callable[..., object]:
    """Compose `conf/train.yaml` as `ldm-train` would, writing everything under tmp_path."""
    from train.config.compose import compose as compose_train

    def _compose(*overrides: str):
        return compose_train([f"paths.root={tmp_path}", *overrides])

    return _compose


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A one-node SLURM cluster for this test session (installed with apt if missing), with
    job accounting (slurmdbd + a private MariaDB) so `sacct` works, stopped by the PIDs its
    daemons wrote."""
    from support.slurm_local import down, up

    directory = tmp_path_factory.mktemp("slurm")
    cluster = up(directory, accounting=True)
    try:
        yield cluster
    finally:
        down(directory)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 (free port, SQLite store and proxied artifacts in a
    temporary folder, its own process group), stopped with its whole group after the session.
    Tests may `stop()` and `restart()` it: it comes back on the same port and store."""
    from mlflow_server import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server")).start()
    try:
        yield server
    finally:
        server.stop()


# The suite's own clock, printed last: CI runs it on whichever machine it gets, and the AMD EPYC
# machines take about 2.3x the Intel ones' time (budgets: README "The two commands").
_SUITE_START = time.monotonic()


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU"
    names = [line.split(":", 1)[1].strip() for line in text.splitlines()
             if line.startswith("model name")]  # fmt: skip
    return names[0] if names else platform.processor() or "unknown CPU"


def pytest_terminal_summary(terminalreporter) -> None:
    elapsed = time.monotonic() - _SUITE_START
    terminalreporter.write_line(
        f"suite wall time: {elapsed:.0f} s ({elapsed / 60:.1f} min) on {cpu_model()}, "
        f"{os.cpu_count()} CPUs"
    )


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A random tiny CLIPModel and its CLIPProcessor, saved (FID/KID features, CLIP score)."""
    from eval_nets import save_tiny_clip

    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def tiny_inception_file(tmp_path_factory) -> Path:
    """A TorchScript file with the call convention of FID's Inception."""
    from eval_nets import save_tiny_inception

    return save_tiny_inception(tmp_path_factory.mktemp("tiny-inception") / "inception-tiny.pt")


@pytest.fixture(scope="session")
def reference_16px(demo_shards: Path, tiny_clip_dir: Path, tmp_path_factory) -> Path:
    """`demo_shards`' reference features (tiny CLIP) at 16 px, the size the tiny preset makes."""
    from train.evaluation.features import ClipImageFeatures
    from train.evaluation.reference import compute_reference

    out = tmp_path_factory.mktemp("ref16") / "val.safetensors"
    compute_reference(str(demo_shards), ClipImageFeatures(str(tiny_clip_dir)), out, 16)
    return out

