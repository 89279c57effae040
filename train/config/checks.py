"""Checks a composed config against the constructors it will call, before anything is built.

Hydra's struct mode rejects unknown override keys, but a YAML file or a `+key=` can still pass a
keyword the target does not take, and nothing checks value types for `_target_` nodes. Building a
16-GPU job only to fail on a typo wastes the queue wait, so every `_target_` node is matched with
its callable's signature here: unknown keywords, values of the wrong type, and local
`pretrained_model_name_or_path` folders that do not exist fail with the dotted key in the message.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from omegaconf import DictConfig, ListConfig, OmegaConf

from train.config.run_files import check_fresh_start, checkpoint_dir
from train.config.signatures import describe, matches, signature
from train.errors import ConfigError

RESERVED = {"_target_", "_partial_", "_convert_", "_recursive_", "_args_"}
__all__ = ["ConfigError", "check_config", "early_checks"]  # ConfigError: where callers import it


def check_config(cfg: DictConfig, prefix: str = "", local_paths: bool = True) -> None:
    """Raise ConfigError for the first bad `_target_` node found in `cfg` (depth first)."""
    for key in cfg:
        # omegaconf's node access (no public equivalent): reads a node without resolving its
        # interpolations, so a check never triggers resolvers or fails on a missing value.
        node = cfg._get_node(key)
        path = f"{prefix}{key}"
        if isinstance(node, DictConfig) and not node._is_none():
            if "_target_" in node:
                _check_target_node(node, path, local_paths)
            check_config(node, path + ".", local_paths)
        elif isinstance(node, ListConfig) and not node._is_none():
            for i, item in enumerate(node):
                if isinstance(item, DictConfig):
                    if "_target_" in item:
                        _check_target_node(item, f"{path}[{i}]", local_paths)
                    check_config(item, f"{path}[{i}].", local_paths)


def early_checks(
    cfg: DictConfig, world_size: int | None = None, local_paths: bool = True, run_dir: bool = True
) -> None:
    """What can be checked without importing model code (torch, diffusers, Lightning take
    seconds to import): required values, the data patterns, the tracking URI, a fresh start
    over an earlier run's checkpoints, and the global batch against the world size. Run first,
    so the commonest mistakes fail within a second or two."""
    from train.config.batching import pixel_cap, plan_for
    from train.config.fit import (
        check_adapter_strategy,
        check_image_inputs,
        check_resolution,
        check_values,
        check_video_inputs,
    )

    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{missing[0]} is required (???); set it, e.g. {missing[0]}=<value>")
    check_values(cfg)
    check_adapter_strategy(cfg)
    check_image_inputs(cfg)
    data = cfg.get("data") or {}
    check_data(cfg, local_paths)
    check_video_inputs(cfg)  # after the shards' own media check, which names what they hold
    check_resolution(cfg, local_paths)
    _check_tracking_uri(cfg)
    paths = cfg.get("paths") or {}
    if run_dir and paths.get("run_dir"):
        problem = check_fresh_start(Path(paths.run_dir), checkpoint_dir(cfg), cfg.get("ckpt_path"))
        if problem:
            raise ConfigError(problem)
    trainer = cfg.get("trainer") or {}
    devices, nodes = trainer.get("devices"), trainer.get("num_nodes", 1)
    if world_size is None and isinstance(devices, int) and devices > 0 and isinstance(nodes, int):
        world_size = devices * nodes
    batch = cfg.get("batch") or {}
    pixel_cap(batch.get("max_pixels_per_device"), data)  # needs no world size
    if world_size and batch.get("global_size") is not None:
        plan_for(batch, data, world_size, int(trainer.get("accumulate_grad_batches") or 1))


def check_data(cfg: DictConfig, local_paths: bool = True) -> None:
    """The data patterns match shards, and (where captions are needed) the first samples of the
    first local shard have one: else every sample would be skipped, after the model is built."""
    from data.preflight import caption_names, caption_problem, local_first_samples
    from data.sources import resolve_shards

    data = cfg.get("data") or {}
    sampler = check_clips(data)
    specs = [("data.urls", data.get("urls")), ("data.val_urls", data.get("val_urls"))]
    specs += [(f"data.datasets[{i}].urls", d.get("urls"))
              for i, d in enumerate(data.get("datasets") or [])]  # fmt: skip
    # Captions feed the text encoder; latent shards carry its output, stage 1 has none.
    fields = None if data.get("latents") or data.get("tokenizer") is None else data.caption_fields
    if OmegaConf.is_config(fields):
        fields = OmegaConf.to_object(fields)
    for key, urls in specs:
        if urls is None or not local_paths:
            continue
        spec = OmegaConf.to_object(urls) if OmegaConf.is_config(urls) else urls
        try:
            shards = resolve_shards(spec)
        except FileNotFoundError as e:
            raise ConfigError(str(e).replace("data.urls=", f"{key}=", 1)) from None
        # One read of the first samples serves both checks.
        samples = local_first_samples(shards, caption_names(fields) if fields else [])
        if not samples:
            continue
        problem = media_mismatch(data, key, shards[0], samples)
        if sampler is not None and problem is None and not data.get("latents"):
            problem = short_clips(data, key, shards[0], sampler)
        if fields is not None and problem is None:
            problem = caption_problem(key, spec, shards[0], samples, fields)
        if problem:
            raise ConfigError(problem)


def check_clips(data: DictConfig) -> Any:
    """`data.video`'s own checks (a frame count the model cannot take): it is cheap to build.
    Returns the ClipSampler (None without data.video)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from train.errors import cause_of

    if data.get("video") is None:
        return None
    try:
        return instantiate(data.video)
    except InstantiationException as e:
        raise ConfigError(str(cause_of(e, (ValueError, TypeError)) or e)) from None


def short_clips(data: DictConfig, key: str, shard: str, sampler: Any) -> str | None:
    """Video shards whose first videos are all too short for one clip."""
    from data.preflight import short_clips_problem
    from data.video import VIDEO_KEYS

    return short_clips_problem(key, shard, sampler, tuple(data.get("video_keys") or VIDEO_KEYS))


def media_mismatch(data: DictConfig, key: str, shard: str, samples: list) -> str | None:
    """Image shards under a video config (`data.video`), or video shards under an image one
    (encoded shards too: image latents or a clip's)."""
    from data.metadata import IMAGE_KEYS
    from data.preflight import latent_media_problem, media_problem
    from data.video import VIDEO_KEYS

    if data.get("latents"):
        return latent_media_problem(key, shard, data.get("video") is not None)
    images = tuple(data.get("image_keys") or IMAGE_KEYS)
    videos = tuple(data.get("video_keys") or VIDEO_KEYS)
    if data.get("video") is not None:
        return media_problem(key, shard, samples, videos, images, "these are image shards: drop "
                             "+data/video (data.video=null) to train on images")  # fmt: skip
    return media_problem(key, shard, samples, images, videos, "these are video shards: read them "
                         "with +data/video=clips (conf/data/video/)")  # fmt: skip


def _check_tracking_uri(cfg: DictConfig) -> None:
    """A tracking URI that cannot work is a config error; a server that is merely down is an
    outage, which the MLflow logger rides out (train/tracking/logger.py)."""
    from train.tracking.spool import check_tracking_uri

    node = (cfg.get("logger") or {}).get("mlflow")
    uri = str(node.get("tracking_uri") or "") if node is not None else ""
    scheme = uri.partition("://")[0]
    if not uri or scheme in ("sqlite", "file", "databricks", "postgresql", "mysql", "mssql"):
        return
    check_tracking_uri(uri)  # credentials in the URI (e.g. from MLFLOW_TRACKING_URI)
    key = "logger.mlflow.tracking_uri"
    if scheme not in ("http", "https"):
        raise ConfigError(
            f"{key}={uri!r}: unknown scheme; use http(s)://host:port for a "
            "server, or sqlite:///path/mlflow.db (the default) for a local store"
        )
    host = urlsplit(uri).hostname
    try:
        socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError, TypeError):
        raise ConfigError(
            f"{key}={uri!r}: host {host!r} does not resolve; fix the URI, or "
            "drop the override to log to the local SQLite store"
        ) from None


def _check_target_node(node: DictConfig, path: str, local_paths: bool = True) -> None:
    try:
        sig = signature(node._target_)
    except Exception as e:  # noqa: BLE001 - any import failure is a config error here
        raise ConfigError(f"{path}._target_={node._target_!r} cannot be imported: {e}") from e
    if sig is None:
        return  # builtins or unresolvable annotations: nothing to check against
    for key in node:
        if key in RESERVED:
            continue
        child = f"{path}.{key}"
        if key not in sig.params:
            if sig.takes_kwargs:
                continue
            raise ConfigError(
                f"{child}: {node._target_} takes no argument {key!r}; "
                f"valid keys: {', '.join(k for k in sig.params if k != 'self')}"
            )
        value = node._get_node(key)
        if OmegaConf.is_missing(node, key):
            raise ConfigError(f"{child} is required (???); set it, e.g. {child}=<value>")
        if isinstance(value, DictConfig) and "_target_" in value:
            continue  # built by its own node; checked there
        plain = (
            OmegaConf.to_object(value) if isinstance(value, (DictConfig, ListConfig)) else node[key]
        )
        if not matches(plain, sig.params[key]):
            raise ConfigError(
                f"{child}={plain!r} has type {type(plain).__name__}, but {node._target_} expects "
                f"{describe(sig.params[key])}"
            )
        if key == "pretrained_model_name_or_path" and local_paths:
            _check_local_path(child, plain)


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
