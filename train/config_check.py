"""Checks a composed config against the constructors it will call, before anything is built.

Hydra's struct mode rejects unknown override keys, but a YAML file or a `+key=` can still pass a
keyword the target does not take, and nothing checks value types for `_target_` nodes. Building a
16-GPU job only to fail on a typo wastes the queue wait, so every `_target_` node is matched with
its callable's signature here: unknown keywords, values of the wrong type, and local
`pretrained_model_name_or_path` folders that do not exist fail with the dotted key in the message.
"""

from __future__ import annotations

import collections.abc as cabc
import inspect
import types
import typing
from pathlib import Path
from typing import Any

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

RESERVED = {"_target_", "_partial_", "_convert_", "_recursive_", "_args_"}


class ConfigError(ValueError):
    """A setting that cannot work; the message names the key and what to do."""


def check_config(cfg: DictConfig, prefix: str = "") -> None:
    """Raise ConfigError for the first bad `_target_` node found in `cfg` (depth first)."""
    for key in cfg:
        node = cfg._get_node(key)
        path = f"{prefix}{key}"
        if isinstance(node, DictConfig) and not node._is_none():
            if "_target_" in node:
                _check_target_node(node, path)
            check_config(node, path + ".")
        elif isinstance(node, ListConfig) and not node._is_none():
            for i, item in enumerate(node):
                if isinstance(item, DictConfig):
                    if "_target_" in item:
                        _check_target_node(item, f"{path}[{i}]")
                    check_config(item, f"{path}[{i}].")


def _check_target_node(node: DictConfig, path: str) -> None:
    try:
        target = get_object(node._target_)
    except Exception as e:  # noqa: BLE001 - any import failure is a config error here
        raise ConfigError(f"{path}._target_={node._target_!r} cannot be imported: {e}") from e
    try:
        params = _parameters(target)
    except (TypeError, ValueError, NameError):
        return  # builtins or unresolvable annotations: nothing to check against
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    for key in node:
        if key in RESERVED:
            continue
        child = f"{path}.{key}"
        if key not in params:
            if takes_kwargs:
                continue
            raise ConfigError(
                f"{child}: {node._target_} takes no argument {key!r}; "
                f"valid keys: {', '.join(k for k in params if k != 'self')}"
            )
        value = node._get_node(key)
        if OmegaConf.is_missing(node, key):
            raise ConfigError(f"{child} is required (???); set it, e.g. {child}=<value>")
        if isinstance(value, DictConfig) and "_target_" in value:
            continue  # built by its own node; checked there
        plain = (
            OmegaConf.to_object(value) if isinstance(value, (DictConfig, ListConfig)) else node[key]
        )
        annotation = params[key].annotation
        if not _matches(plain, annotation):
            raise ConfigError(
                f"{child}={plain!r} has type {type(plain).__name__}, but {node._target_} expects "
                f"{_name(annotation)}"
            )
        if key == "pretrained_model_name_or_path":
            _check_local_path(child, plain)


def _parameters(target: Any) -> dict[str, inspect.Parameter]:
    """Parameters of `target`. A class of this project whose `**kwargs` go to its base's
    `__init__` (the launchers' shared resources) gets that base's parameters too, so an unknown
    key is still caught; other libraries' `**kwargs` may mean anything and stay open."""
    params = dict(inspect.signature(target, eval_str=True).parameters)
    ours = ("train", "data", "jobs")
    if not inspect.isclass(target) or target.__module__.split(".")[0] not in ours:
        return params
    current = target.__init__
    for base in target.__mro__[1:]:
        var_kw = [k for k, p in params.items() if p.kind is p.VAR_KEYWORD]
        if not var_kw or base.__module__.split(".")[0] not in ours:
            break
        init = vars(base).get("__init__")
        if init is None or init is current:
            continue
        current = init
        inherited = inspect.signature(init, eval_str=True).parameters
        params = {k: p for k, p in params.items() if k not in var_kw} | {
            k: p for k, p in inherited.items() if k != "self" and k not in params
        }
    return params


def _check_local_path(key: str, value: Any) -> None:
    if not isinstance(value, str):
        return
    looks_local = value.startswith(("/", "./", "../", "~")) or value.count("/") > 1
    if looks_local and not Path(value).expanduser().exists():
        raise ConfigError(
            f"{key}={value!r}: no such folder. Point it at a diffusers/transformers model folder "
            "(for the demo VAE, run the autoencoder stage first: ldm-train "
            "experiment=demo_autoencoder)"
        )


def _name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _matches(value: Any, annotation: Any) -> bool:
    """True where `value` fits `annotation`; unknown or exotic annotations are accepted."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if annotation is type(None):
        return value is None
    if origin is typing.Literal:
        return value in args
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin in (list, tuple, cabc.Sequence) or annotation in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        inner = [a for a in args if a is not Ellipsis]
        return len(inner) != 1 or all(_matches(v, inner[0]) for v in value)
    if origin in (dict, cabc.Mapping) or annotation in (dict,):
        return isinstance(value, dict)
    return True
