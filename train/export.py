"""`ldm-export CKPT OUT`: a Lightning checkpoint -> diffusers-layout folder with safetensors."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from train import config


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint without unpickling arbitrary objects (`weights_only=True`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return torch.load(path, map_location="cpu", weights_only=True)


def module_from_checkpoint(path: str | Path):
    """Rebuild the LightningModule from the config stored in the checkpoint, then its weights."""
    ckpt = load_checkpoint(path)
    if "ldm_config" not in ckpt:
        raise ValueError(f"{path} has no 'ldm_config': it was not written by ldm-train")
    config.register()
    module = instantiate(OmegaConf.create(ckpt["ldm_config"]["model"]))
    result = module.load_state_dict(ckpt["state_dict"], strict=False)
    frozen = getattr(module, "frozen_prefixes", ())
    missing = [k for k in result.missing_keys if not k.startswith(frozen)]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{path} does not match the model its config builds: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    return module


def export_checkpoint(ckpt_path: str | Path, out_dir: str | Path) -> Path:
    module = module_from_checkpoint(ckpt_path)
    module.eval()
    return module.export(out_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ldm-export", description=__doc__)
    parser.add_argument("checkpoint", help="a .ckpt written by ldm-train (e.g. .../last.ckpt)")
    parser.add_argument("out", help="output folder (replaced atomically if it exists)")
    args = parser.parse_args(argv)
    out = export_checkpoint(args.checkpoint, args.out)
    print(f"exported {args.checkpoint} -> {out}")
