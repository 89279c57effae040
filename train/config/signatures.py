"""Constructor signatures of config targets, reduced to what a config check needs and cached.

Checking a config against `lightning.Trainer` or diffusers' classes means importing them, which
takes seconds (Lightning alone ~4 s on a small CPU). The parameters and a JSON form of their
annotations are therefore cached per target, keyed by the installed version of the package that
provides it (or the newest file time of this project's own code), so a later check of any
config using those targets imports nothing heavy. A cache that cannot be read or written only
costs the imports.
"""

from __future__ import annotations

import collections.abc as cabc
import contextlib
import functools
import inspect
import json
import os
import types
import typing
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from hydra.utils import get_object

OURS = ("train", "data", "jobs")
CACHE_VERSION = 1


@dataclass
class Signature:
    params: dict[str, Any]  # name -> annotation spec (JSON: "int", ["union", [...]], "any", ...)
    takes_kwargs: bool


def cache_file() -> Path:
    root = os.environ.get("LDM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ldm-pipeline"
    )
    return Path(root) / "signatures.json"


def signature(target_path: str) -> Signature | None:
    """The signature of `target_path` (a `_target_`), from the cache or by importing it. None
    where it has none to check against. Raises ImportError-like errors from the import."""
    key = f"{CACHE_VERSION}|{target_path}|{_provenance(target_path)}"
    cache = _read_cache()
    if key in cache:
        entry = cache[key]
        return None if entry is None else Signature(entry["params"], entry["takes_kwargs"])
    target = get_object(target_path)
    try:
        params = parameters(target)
    except (TypeError, ValueError, NameError):
        sig = None  # builtins or unresolvable annotations
    else:
        kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
        sig = Signature({k: spec(p.annotation) for k, p in params.items()
                         if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}, kwargs)  # fmt: skip
    cache[key] = None if sig is None else {"params": sig.params, "takes_kwargs": sig.takes_kwargs}
    _write_cache(cache)
    return sig


def _provenance(target_path: str) -> str:
    """What invalidates a cached signature: a change to this project's code, or another version
    of the distribution that provides the target."""
    return _provenance_of(target_path.split(".", 1)[0])


@functools.cache
def _provenance_of(top: str) -> str:
    if top in OURS:
        # Any file of the project: a class's signature can come from a base in another module.
        root = Path(__file__).resolve().parents[2]
        files = [f for pkg in OURS for f in (root / pkg).rglob("*.py")]
        return f"project@{max((f.stat().st_mtime_ns for f in files), default=0)}"
    # Most packages are their distribution's name (torch, lightning, diffusers): one metadata
    # read. Only the others (hydra -> hydra-core) need the map of every installed distribution.
    with contextlib.suppress(metadata.PackageNotFoundError):
        return f"{top}=={metadata.version(top)}"
    for dist in _distributions().get(top, ()):
        with contextlib.suppress(metadata.PackageNotFoundError):
            return f"{dist}=={metadata.version(dist)}"
    return "unknown"


@functools.cache
def _distributions() -> dict[str, list[str]]:
    # Once per process: `packages_distributions` reads every installed distribution's file list
    # (~0.45 s on a small CPU, ~2 s when it ran once per package).
    return metadata.packages_distributions()


def _read_cache() -> dict[str, Any]:
    try:
        return json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(cache: dict[str, Any]) -> None:
    path = cache_file()
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, path)  # concurrent ranks each write a whole file


def parameters(target: Any) -> dict[str, inspect.Parameter]:
    """Parameters of `target`. A class of this project whose `**kwargs` go to its base's
    `__init__` (the launchers' shared resources) gets that base's parameters too, so an unknown
    key is still caught; other libraries' `**kwargs` may mean anything and stay open."""
    params = dict(inspect.signature(target, eval_str=True).parameters)
    if not inspect.isclass(target) or target.__module__.split(".")[0] not in OURS:
        return params
    current = target.__init__
    for base in target.__mro__[1:]:
        var_kw = [k for k, p in params.items() if p.kind is p.VAR_KEYWORD]
        if not var_kw or base.__module__.split(".")[0] not in OURS:
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


def spec(annotation: Any) -> Any:
    """A JSON form of the annotations a config value can be checked against; "any" otherwise."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return "any"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return ["union", [spec(a) for a in args]]
    if annotation is type(None):
        return "none"
    if origin is typing.Literal:
        ok = all(isinstance(a, str | int | float | bool | type(None)) for a in args)
        return ["literal", list(args)] if ok else "any"
    if annotation in (bool, int, float, str):
        return annotation.__name__
    if origin in (list, tuple, cabc.Sequence) or annotation in (list, tuple):
        inner = [a for a in args if a is not Ellipsis]
        return ["seq", spec(inner[0]) if len(inner) == 1 else "any"]
    if origin in (dict, cabc.Mapping) or annotation is dict:
        return "dict"
    return "any"


def matches(value: Any, s: Any) -> bool:
    """Whether a plain config value fits the spec."""
    if s == "any":
        return True
    if s == "none":
        return value is None
    if s == "bool":
        return isinstance(value, bool)
    if s == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if s == "float":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if s == "str":
        return isinstance(value, str)
    if s == "dict":
        return isinstance(value, dict)
    kind, arg = s
    if kind == "union":
        return any(matches(value, a) for a in arg)
    if kind == "literal":
        return value in arg
    return isinstance(value, list | tuple) and all(matches(v, arg) for v in value)


def describe(s: Any) -> str:
    if isinstance(s, str):
        return {"none": "None", "dict": "dict", "any": "Any"}.get(s, s)
    kind, arg = s
    if kind == "union":
        return " | ".join(describe(a) for a in arg)
    if kind == "literal":
        return f"one of {arg}"
    return f"list[{describe(arg)}]"


def warm(conf_dir: Path) -> int:
    """Cache the signature of every `_target_` named in the configs under `conf_dir` (run by
    `make setup`, so that even the first bad config on a machine fails fast). Returns how many."""
    targets = set()
    for path in Path(conf_dir).rglob("*.yaml"):
        for line in path.read_text().splitlines():
            key, _, value = line.strip().partition(":")
            if key in ("_target_", "- _target_") and value.strip():
                targets.add(value.split("#", 1)[0].strip())
    for target in sorted(targets):
        with contextlib.suppress(Exception):  # a target this machine cannot import: no entry
            signature(target)
    return len(targets)


if __name__ == "__main__":
    count = warm(Path(__file__).resolve().parents[2] / "conf")
    print(f"cached the signatures of {count} config targets in {cache_file()}")
