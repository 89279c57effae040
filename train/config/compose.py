"""The training config composed as `ldm-train` composes it, for the tools, jobs and tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

# The repo's conf/ (editable install); add your own with --config-dir or hydra.searchpath.
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def compose(overrides: Sequence[str]) -> DictConfig:
    """`conf/train.yaml` composed with `overrides`, as `ldm-train` would."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from train.config.resolvers import register

    register()
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        return hydra_compose("train", overrides=list(overrides))
