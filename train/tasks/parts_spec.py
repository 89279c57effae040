"""What a checkpoint records to rebuild its pipeline: the diffusers/transformers class names and
configs of every part, where each frozen part's weights come from, and the export scheduler.

`ldm-export` rebuilds from this, not from the run's `_target_` strings, so renaming one of our
classes never orphans old checkpoints. Frozen parts loaded with `from_pretrained` are recorded
by their folder or hub id (and subfolder); random-init ones (tiny test configs) by their weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from train.models.unwrap import model_class

FORMAT = 1


def _plain(value: Any) -> Any:
    # weights_only checkpoint loading accepts only plain containers: no FrozenDict, no tuples.
    return json.loads(json.dumps(value, default=str))


def _library(obj: Any) -> str:
    return type(obj).__module__.split(".")[0]


def _config(obj: Any) -> dict:
    cfg = obj.config
    return _plain(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg))


def _pretrained(obj: Any) -> str | None:
    path = getattr(obj, "name_or_path", None)
    if path is None and hasattr(obj, "config"):
        path = obj.config.get("_name_or_path") if hasattr(obj.config, "get") else None
    return str(path) if path else None


def _subfolder(path: str, name: str, cls: str) -> str | None:
    """The subfolder of a local pretrained folder that holds component `name` of class `cls`."""
    root = Path(path)
    if not root.is_dir():
        # A hub id: pipeline repos keep each part in the subfolder named after it.
        return name if name.startswith(("vae", "text_encoder", "tokenizer")) else None
    for sub in [None, name, *sorted(p.name for p in root.iterdir() if p.is_dir())]:
        folder = root / sub if sub else root
        for file in ("config.json", "tokenizer_config.json"):
            f = folder / file
            if f.is_file():
                meta = json.loads(f.read_text())
                found = {meta.get("_class_name"), meta.get("tokenizer_class"),
                         *(meta.get("architectures") or [])}  # fmt: skip
                if cls in found or (cls.removesuffix("Fast") in found):
                    return sub
    return None


def part_spec(name: str, part: Any) -> dict:
    """One component: a model (config + weights or pretrained source) or a tokenizer."""
    spec: dict[str, Any] = {"library": _library(part), "class": type(part).__name__}
    source = _pretrained(part)
    if hasattr(part, "state_dict") and isinstance(part, torch.nn.Module):
        spec["config"] = _config(part)
        if source is None:
            spec["state"] = {k: v.detach().cpu().clone() for k, v in part.state_dict().items()}
            return spec
    else:  # a tokenizer
        spec["kwargs"] = {"model_max_length": int(part.model_max_length)}
    spec["pretrained"], spec["subfolder"] = source, _subfolder(source, name, spec["class"])
    return spec


def describe(module: Any) -> dict:
    """The spec of a LatentDiffusion module (see the module docstring)."""
    backbone = module.backbone
    frozen = {"vae": module.vae, **module.conditioner.pipeline_parts(),
              **backbone.frozen_parts()}  # fmt: skip
    return {
        "format": FORMAT,
        "pipeline": backbone.pipeline_class,
        "pipeline_extras": _plain(backbone.pipeline_extras()),
        "trainable": {
            "component": backbone.component,
            "library": model_class(backbone.model).__module__.split(".")[0],
            "class": model_class(backbone.model).__name__,
            "config": _config(backbone.model),
            "prefix": "backbone.model.",
        },
        # None: a part the pipeline runs without (SD3 with text_encoder_3=None).
        "frozen": {name: part_spec(name, part) if part is not None else None
                   for name, part in frozen.items()},  # fmt: skip
        "scheduler": {
            "class": module.objective.export_scheduler,
            "config": _plain(module.objective.scheduler_config()),
        },
    }


def _class(spec: dict) -> Any:
    import importlib

    return getattr(importlib.import_module(spec["library"]), spec["class"])


def build_part(spec: dict) -> Any:
    cls = _class(spec)
    if "config" not in spec:  # a tokenizer
        return _load_pretrained(cls, spec, **spec["kwargs"])
    if "state" in spec:
        model = _from_config(cls, spec)
        model.load_state_dict(spec["state"], strict=True)
        return model.eval()
    model = _load_pretrained(cls, spec).eval()
    if "use_attention_mask" in spec["config"]:
        # Set by our conditioner, not saved in the pretrained folder; the pipelines read it.
        model.config.use_attention_mask = spec["config"]["use_attention_mask"]
    return model


def _load_pretrained(cls: Any, spec: dict, **kwargs: Any) -> Any:
    """From the recorded folder; for a hub id the subfolder is the pipelines' convention
    (`_subfolder`), which a single-model repo (e.g. openai/clip-vit-large-patch14) lacks."""
    if not spec["subfolder"]:
        return cls.from_pretrained(spec["pretrained"], **kwargs)
    try:
        return cls.from_pretrained(spec["pretrained"], subfolder=spec["subfolder"], **kwargs)
    except OSError:
        if Path(spec["pretrained"]).is_dir():
            raise
        return cls.from_pretrained(spec["pretrained"], **kwargs)


def _from_config(cls: Any, spec: dict) -> Any:
    if spec["library"] == "transformers":
        import transformers

        config = transformers.AutoConfig.for_model(**spec["config"])
        return cls(config)
    return cls.from_config(spec["config"])


def rebuild_pipeline(spec: dict, state: dict[str, torch.Tensor]) -> Any:
    """The pipeline a checkpoint's spec describes, the trainable model holding `state`."""
    import diffusers

    t = spec["trainable"]
    model = _class(t).from_config(t["config"])
    model.load_state_dict(state, strict=True)
    parts = {name: build_part(s) if s is not None else None for name, s in spec["frozen"].items()}
    scheduler = getattr(diffusers, spec["scheduler"]["class"]).from_config(
        spec["scheduler"]["config"]
    )
    pipe_cls = getattr(diffusers, spec["pipeline"])
    return pipe_cls(**{t["component"]: model.eval(), **parts, "scheduler": scheduler,
                       **spec["pipeline_extras"]})  # fmt: skip


def trainable_state(spec: dict, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    prefix = spec["trainable"]["prefix"]
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
