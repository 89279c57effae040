"""`ldm-train`: the Hydra application. `ldm-train experiment=demo trainer.max_steps=100`."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import hydra
from omegaconf import DictConfig

from train import config
from train.config_check import ConfigError

config.register()
# The repo's conf/ (editable install); add your own with --config-dir or hydra.searchpath.
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _app(cfg: DictConfig) -> float | None:
    from train.run import run  # heavy imports after the config is composed

    try:
        return run(cfg)
    except ConfigError as e:
        print(f"Config error: {e}", file=sys.stderr)
        sys.exit(2)


def compose(overrides: Sequence[str]) -> DictConfig:
    """`conf/train.yaml` composed with `overrides`, as `ldm-train` would (for tools and tests)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        return hydra_compose("train", overrides=list(overrides))


def main() -> None:
    _app()
