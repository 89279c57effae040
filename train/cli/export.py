"""`ldm-export CKPT OUT`: a checkpoint (file or sharded folder) -> diffusers-layout safetensors."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

from train.errors import BAD_INPUT, ArgumentParser, ConfigError, bad_input, cause_of, debug_flag

# torch, Hydra, Lightning and diffusers load inside the functions: `check_checkpoint` answers a
# wrong path in about a second, not after 8 s of imports.
ADAPTER_FORMATS = ("diffusers-lora", "kohya")
EXAMPLE = "pass a checkpoint written by ldm-train, e.g. RUN_DIR/checkpoints/last.ckpt"


def build_module(model: Any, seed: int) -> Any:
    """The LightningModule `model` (its config node) describes, built from a fixed RNG state:
    frozen parts built from config (a random-init VAE, as the tiny configs use) are then the
    same in training and in every later `ldm-export`, which rebuilds them instead of storing
    them in checkpoints."""
    import torch
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    torch.manual_seed(seed)
    try:
        return instantiate(model)
    except InstantiationException as e:
        # A part's own check (e.g. a backbone that does not fit the VAE) raised ConfigError
        # inside Hydra: answer it as the one-line config error it is.
        cause = cause_of(e, (ConfigError,))
        if cause is None:
            raise
        raise cause from None


def module_from_checkpoint(path: str | Path, allow_pickle: bool = False):
    """Rebuild the LightningModule from the config stored in the checkpoint, then its weights
    (for tools that need the module; `export_checkpoint` rebuilds from the parts spec instead).

    Also returns the checkpoint's whole EMA state (None without EMA). `path` may be a .ckpt
    file or a sharded DeepSpeed / FSDP checkpoint folder.
    """
    return module_from_loaded(load_checkpoint(path, allow_pickle), path)


def module_from_loaded(ckpt: dict, path: str | Path):
    """`module_from_checkpoint` of a checkpoint already loaded from `path`."""
    from omegaconf import OmegaConf

    from train.callbacks.ema import ema_from_checkpoint
    from train.config import resolvers as config
    from train.tasks.legacy import upgrade

    config.register()
    saved = upgrade(ckpt)["ldm_config"]
    module = build_module(OmegaConf.create(saved["model"]), int(saved.get("seed") or 0))
    result = module.load_state_dict(ckpt["state_dict"], strict=False)
    missing = result.missing_keys
    if getattr(getattr(module, "backbone", None), "adapter", None) is not None:
        # An adapter checkpoint holds what trains; the frozen base came from model.base.
        from train.models.adapters import trainable_keys

        missing = sorted(set(missing) & trainable_keys(module))
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{path} does not match the model its config builds: missing "
            f"{missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    return module, ema_from_checkpoint(ckpt)


def load_text_ema(module: Any, ckpt: dict) -> None:
    """Put the checkpoint's EMA of a text encoder's adapter into `module` (when it has one)."""
    from train.callbacks.ema import text_ema_from_checkpoint

    text = text_ema_from_checkpoint(ckpt)
    if text is None:
        return
    result = module.trained_conditioner.load_state_dict(text, strict=False)
    if result.unexpected_keys:  # strict=False is for the frozen base, not for loading nothing
        raise ValueError(f"text-encoder EMA keys not in the model: {result.unexpected_keys[:5]}")


def load_checkpoint(path: str | Path, allow_pickle: bool = False) -> dict:
    from train.distributed.sharding import load_any_checkpoint

    ckpt = load_any_checkpoint(path, allow_pickle)
    if "ldm_config" not in ckpt:
        raise ValueError(f"{path} has no 'ldm_config': it was not written by ldm-train")
    return ckpt


def export_checkpoint(
    ckpt_path: str | Path,
    out_dir: str | Path,
    use_ema: bool = True,
    allow_pickle: bool = False,
    fmt: str = "merged",
) -> Path:
    """Write the diffusers-layout export of a checkpoint: EMA weights when it has them. Rebuilt
    from the checkpoint's parts spec (diffusers configs); a checkpoint from before the spec
    existed, or of an adapter run (whose base loads from `model.base`), goes through its saved
    config. ``fmt``: ``merged`` (a whole pipeline; an adapter merged into its base) or
    ``diffusers-lora`` (an adapter run's LoRA in diffusers' format) or ``kohya`` (the adapter, LoRA,
    DoRA, LoHa or LoKr, as one file in the kohya / LyCORIS layout A1111 and ComfyUI load)."""
    from train.util import atomic_dir

    ckpt = load_checkpoint(ckpt_path, allow_pickle)
    if fmt in ADAPTER_FORMATS and not has_adapter(ckpt):
        raise ConfigError(f"{ckpt_path} is not an adapter run's checkpoint (no "
                          "model.backbone.adapter): export it with --format merged")  # fmt: skip
    if "ldm_parts" not in ckpt or has_adapter(ckpt):
        module, ema = module_from_loaded(ckpt, ckpt_path)
        module.eval()
        if use_ema:
            load_text_ema(module, ckpt)
        model = module.model_from_state(ema) if use_ema and ema is not None else None
        if fmt == "diffusers-lora":
            return module.export_lora(out_dir, model)
        if fmt == "kohya":
            from train.tasks.pipelines import export_kohya

            return export_kohya(module, out_dir, model)
        return module.export(out_dir, model)
    from train.tasks.pipelines import save_pipeline

    pipe = checkpoint_pipeline(ckpt, use_ema)
    with atomic_dir(out_dir) as tmp:
        save_pipeline(pipe, tmp)
    return Path(out_dir)


def checkpoint_pipeline(ckpt: dict, use_ema: bool = True) -> Any:
    """The diffusers pipeline of a loaded checkpoint (EMA weights when it has them and `use_ema`),
    in memory: what `export_checkpoint` saves, and what `ldm-eval --watch` scores."""
    from train.callbacks.ema import ema_from_checkpoint
    from train.models.adapters import merged
    from train.tasks.parts_spec import rebuild_pipeline, trainable_state

    if "ldm_parts" not in ckpt:
        raise ValueError("the checkpoint predates its parts spec: export it with ldm-export")
    if has_adapter(ckpt):
        module, ema = module_from_loaded(ckpt, "the checkpoint")
        model = module.model_from_state(ema) if use_ema and ema is not None else None
        if use_ema:
            load_text_ema(module, ckpt)
        return module.eval().pipeline(model=merged(model or module.trainable))
    spec = ckpt["ldm_parts"]
    ema = ema_from_checkpoint(ckpt) if use_ema else None
    state = ema if ema is not None else trainable_state(spec, ckpt["state_dict"])
    return rebuild_pipeline(spec, state)


def export_single_file(
    source: str | Path, out: str | Path, use_ema: bool, allow_pickle: bool, any_shape: bool
) -> Path:
    """Write `source` (a checkpoint, or an export folder) as one single-file checkpoint `out`
    (``--format single-file``); see train/exports/single_file.py for what is refused."""
    from train.exports import single_file

    if Path(source, "model_index.json").is_file():
        from train.cli.sample import load_pipeline

        pipe = load_pipeline(source)  # safetensors only; the sampler swap keeps prediction_type
    else:
        pipe = checkpoint_pipeline(load_checkpoint(source, allow_pickle), use_ema)
    path, arch = single_file.write(pipe, out, any_shape)
    print(f"{arch} single-file checkpoint")
    return path


def check_single_file_args(source: str | Path, out: str | Path) -> None:
    """ConfigError unless `out` names a .safetensors file and `source` is an export folder or
    can be a checkpoint."""
    if Path(out).suffix != ".safetensors" or Path(out).is_dir():
        raise ConfigError(f"--format single-file writes one file: name OUT like model.safetensors, "
                          f"not {out}")  # fmt: skip
    if not Path(source, "model_index.json").is_file():
        check_checkpoint(source)


def has_adapter(ckpt: dict) -> bool:
    """Whether the checkpoint is an adapter run's (LoRA, ...): it holds the adapter only."""
    backbone = (ckpt.get("ldm_config") or {}).get("model", {}).get("backbone") or {}
    return bool(backbone.get("adapter"))


def check_checkpoint(path: str | Path) -> None:
    """ConfigError unless `path` can be a checkpoint: a zip file (torch.save's format), or a
    DeepSpeed / FSDP checkpoint folder; an export folder is named as one."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"checkpoint {path} does not exist; {EXAMPLE}")
    if path.is_dir():
        if (path / "model_index.json").is_file():
            raise ConfigError(f"{path} is an export (a diffusers folder), not a checkpoint: "
                              f"ldm-sample and ldm-eval read it as it is; {EXAMPLE}")  # fmt: skip
        if not ((path / "latest").is_file() or (path / "checkpoint").is_dir()
                or (path / "meta.pt").is_file()):  # fmt: skip
            raise ConfigError(f"{path} is a folder but not a sharded DeepSpeed/FSDP checkpoint "
                              f"(no 'latest', 'checkpoint/' or 'meta.pt'); {EXAMPLE}")  # fmt: skip
    elif not zipfile.is_zipfile(path):
        raise ConfigError(f"{path} is not a checkpoint (not a torch.save zip file); {EXAMPLE}")


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="ldm-export", description=__doc__)
    parser.add_argument("checkpoint", help="a .ckpt written by ldm-train (e.g. .../last.ckpt); "
                        "for --format single-file also an export folder")  # fmt: skip
    parser.add_argument("out", help="output folder (replaced atomically if it exists); for "
                        "--format single-file a .safetensors file")  # fmt: skip
    parser.add_argument(
        "--no-ema", action="store_true", help="export the raw weights even if the run kept an EMA"
    )
    parser.add_argument(
        "--format",
        choices=("merged", *ADAPTER_FORMATS, "single-file"),
        default="merged",
        help="merged (default): a whole diffusers pipeline, an adapter merged into its base; "
        "diffusers-lora: an adapter run's LoRA for pipe.load_lora_weights; kohya: the adapter "
        "(LoRA, DoRA, LoHa, LoKr) as OUT/lora.safetensors for A1111's and ComfyUI's lora "
        "folders; single-file: an SD-1.x/2.x/SDXL model as one checkpoint file for A1111's and "
        "ComfyUI's checkpoints",
    )
    parser.add_argument(
        "--any-shape",
        action="store_true",
        help="single-file: write the layout even for a shape A1111 and ComfyUI cannot load "
        "(diffusers' from_single_file(config=EXPORT) reads it)",
    )
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read a sharded DeepSpeed/FSDP checkpoint folder (its readers unpickle: only for "
        "checkpoints you trust); .ckpt files never need it",
    )
    args = parser.parse_args(argv)
    single = args.format == "single-file"
    with bad_input("ldm-export:", debug_flag(args)):
        if args.any_shape and not single:
            raise ConfigError("--any-shape applies to --format single-file only")
        if single:
            check_single_file_args(args.checkpoint, args.out)
        else:
            check_checkpoint(args.checkpoint)
    # ValueError: a folder that needs --allow-pickle, a checkpoint not written by ldm-train.
    with bad_input("ldm-export:", debug_flag(args), (*BAD_INPUT, ValueError)):
        try:
            if single:
                out = export_single_file(args.checkpoint, args.out, not args.no_ema,
                                         args.allow_pickle, args.any_shape)  # fmt: skip
            else:
                out = export_checkpoint(
                    args.checkpoint, args.out, not args.no_ema, args.allow_pickle, args.format
                )
        except pickle.UnpicklingError as e:  # weights_only=True refused a pickled object
            raise ConfigError(
                f"{args.checkpoint} cannot be loaded: Weights only load failed (it holds pickled "
                f"objects, and none is run); {EXAMPLE}"
            ) from e
    print(f"exported {args.checkpoint} -> {out}")
