"""Config checks that need no model: numbers in range, and the data resolution against what the
UNet and VAE generate, from config values (or a local pretrained folder's config.json).

Lightning rejects `trainer.max_steps=-5` and the run rejects a resolution the model does not
generate, but only once torch, Lightning and the model are built (20-30 s). Here both fail in
about a second, with the setting and the fix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from train.errors import ConfigError

# (key, smallest value, what to set instead); None values mean "not set" and are not checked.
BOUNDS: tuple[tuple[str, int | float, str], ...] = (
    ("trainer.max_steps", -1, "a number of steps >= 1, or -1 to stop by trainer.max_epochs"),
    ("trainer.max_epochs", -1, "a number of epochs >= 1, or -1 for no limit"),
    ("trainer.accumulate_grad_batches", 1, "1 or more micro-batches per optimizer step"),
    ("trainer.log_every_n_steps", 1, "1 or more"),
    ("data.batch_size", 1, "1 or more samples per device"),
    ("data.resolution", 1, "the image size in pixels, e.g. data.resolution=256"),
    ("data.num_workers", 0, "0 (load in the training process) or more worker processes"),
    ("batch.global_size", 1, "1 or more samples per optimizer step, or null"),
    ("threads", 1, "1 or more CPU threads per process, or null (a share of the CPUs)"),
)


def check_values(cfg: DictConfig) -> None:
    """Counts and sizes below their smallest sensible value; wrong types are left to
    check_config, which names the type the constructor expects."""
    for key, low, fix in BOUNDS:
        value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        if isinstance(value, int) and not isinstance(value, bool) and value < low:
            raise ConfigError(f"{key}={value} is out of range; set {key} to {fix}")
    lr = OmegaConf.select(cfg, "model.optimizer.lr", default=None)
    if isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr <= 0:
        raise ConfigError(f"model.optimizer.lr={lr} must be positive, e.g. model.optimizer.lr=1e-4")


FSDP_TARGETS = ("FSDPStrategy", "FSDP2Strategy")


def check_adapter_strategy(cfg: DictConfig) -> None:
    """Under FSDP an adapter trains as LoRA only: each layer holding adapter weights is an FSDP
    unit of its own, called through its forward. DoRA reads its LoRA layers' weights directly
    and LoHa/LoKr keep them in parameter dicts (no forward), which FSDP would hand them as
    flat shards; ZeRO-3 gathers those on access and takes every adapter."""
    adapter = OmegaConf.select(cfg, "model.backbone.adapter", default=None)
    strategy = cfg.get("strategy") or {}
    target = str(strategy.get("_target_", "")) if isinstance(strategy, DictConfig) else ""
    check_text_adapter_strategy(cfg, target)
    if not isinstance(adapter, DictConfig) or not target.endswith(FSDP_TARGETS):
        return
    kind = str(adapter.get("_target_", "")).rsplit(".", 1)[-1]
    if kind == "LoraConfig" and adapter.get("use_dora"):
        kind = "DoRA (LoraConfig use_dora)"
    name = "FSDP2" if target.endswith("FSDP2Strategy") else "FSDP"
    if kind != "LoraConfig":
        raise ConfigError(
            f"model.backbone.adapter is {kind} and the strategy is {name}, which shards a LoRA "
            f"only: use model/backbone/adapter=lora with strategy={name.lower()}, or keep the "
            "adapter with strategy=deepspeed_zero3 (or ddp, deepspeed_zero2)"
        )


def check_text_adapter_strategy(cfg: DictConfig, target: str) -> None:
    """A text-encoder adapter trains on the encoder every rank holds whole (the frozen parts are
    never sharded, and rank 0 alone encodes the prompts of previews and exports): under ZeRO-3
    or FSDP its weights would be shards that rank 0 cannot run alone."""
    if not isinstance(OmegaConf.select(cfg, "model.conditioner.adapter", default=None),
                      DictConfig):  # fmt: skip
        return
    stage = OmegaConf.select(cfg, "strategy.stage", default=None)
    if target.endswith(FSDP_TARGETS) or (target.endswith("DeepSpeedStrategy") and stage == 3):
        raise ConfigError(
            f"model.conditioner.adapter trains the text encoder, which {target.rsplit('.', 1)[-1]}"
            f"{' stage 3' if stage == 3 else ''} would shard; train it under strategy=ddp, "
            "deepspeed_zero1 or deepspeed_zero2, or keep the adapter on the denoiser alone"
        )


def check_image_inputs(cfg: DictConfig) -> None:
    """A ControlNet needs a control image from the data; it, an inpainting model and an
    image-to-video one sample from images, so none can be scored by the evaluation callback
    (its prompts come alone) or trained on encoded shards (which hold no images)."""
    target = str(OmegaConf.select(cfg, "model.backbone._target_", default="") or "")
    kinds = {"ControlNetBackbone": "controlnet", "SD3ControlNetBackbone": "controlnet",
             "InpaintUNetBackbone": "inpaint",
             "WanImageToVideoBackbone": "wan_i2v_tiny"}  # fmt: skip
    kind = kinds.get(target.rsplit(".", 1)[-1])
    if kind is None:
        return
    if kind == "controlnet" and OmegaConf.select(cfg, "data.control", default=None) is None:
        raise ConfigError(
            "model/backbone=controlnet needs a control image per sample: set data/control="
            "member (KEY.control.png in the shards), mask or edges (conf/data/control/)"
        )
    if OmegaConf.select(cfg, "callbacks.eval", default=None) is not None:
        raise ConfigError(
            f"callbacks/eval scores prompts without images, which a model/backbone={kind} cannot"
            " sample from; drop callbacks/eval (callbacks.eval=null) and judge it by its previews"
        )
    if OmegaConf.select(cfg, "data.latents", default=False):
        raise ConfigError(
            f"data.latents=true: encoded shards hold no images, which model/backbone={kind} "
            "trains from; use the image shards (data.latents=false)"
        )


# Backbones that train on clips (data.video), by class name: read before model code is imported.
VIDEO_BACKBONES = ("MotionUNetBackbone", "WanBackbone", "WanImageToVideoBackbone")


def check_video_inputs(cfg: DictConfig) -> None:
    """A video backbone needs clips (data.video), an image backbone images."""
    target = str(OmegaConf.select(cfg, "model.backbone._target_", default="") or "")
    if not target or "data" not in cfg:
        return
    name = target.rsplit(".", 1)[-1]
    video = OmegaConf.select(cfg, "data.video", default=None) is not None
    if name in VIDEO_BACKBONES and not video:
        raise ConfigError(
            f"model.backbone is {name}, a video model, but data.video is "
            "not set: read clips from video shards with +data/video=clips (conf/data/video/)"
        )
    if name not in VIDEO_BACKBONES and video:
        raise ConfigError(
            f"data.video is set but model.backbone ({name}) is an image "
            "model: train clips with a video backbone (model/backbone=motion, wan or their _tiny) "
            "or drop +data/video (data.video=null)"
        )


def resolution_problem(
    have: int,
    sample_size: int,
    factor: int,
    pretrained: bool = False,
    setting: str = "model.backbone.model.sample_size",
) -> str:
    """The message for data.resolution != UNet sample size x VAE downsampling ('' if it fits):
    both ways out, since the user may want the data's size rather than the model's. `setting`:
    where the sample size is set (Flux's adapter holds it, not the model's config)."""
    want = sample_size * factor
    if have == want:
        return ""
    plus = "+" if pretrained else ""
    other = (
        f" or {plus}{setting}={have // factor} (to train at {have} px)"
        if have % factor == 0
        else f" (data.resolution must be a multiple of the VAE downsampling {factor})"
    )
    return (
        f"data.resolution={have} but the model generates {want} px images ({setting}="
        f"{sample_size} x VAE downsampling {factor}); set data.resolution={want}{other}"
    )


def check_resolution(cfg: DictConfig, local_paths: bool = True) -> None:
    """Stage 2 (a backbone over a VAE's latents): data.resolution = the backbone's sample size
    x 2**(VAE levels-1), for backbones whose config has a sample size."""
    model = cfg.get("model") or {}
    have = OmegaConf.select(cfg, "data.resolution", default=None)
    # A ControlNet's base UNet sets the size (the ControlNet's own config has none), and an
    # AnimateDiff backbone's image UNet.
    key = next((k for k in ("base.model", "unet", "model")
                if OmegaConf.select(cfg, f"model.backbone.{k}", default=None) is not None),
               "model")  # fmt: skip
    backbone = OmegaConf.select(cfg, f"model.backbone.{key}", default=None)
    if not isinstance(have, int) or backbone is None or model.get("vae") is None:
        return
    unet = part_config(backbone, local_paths)
    vae = part_config(model.vae, local_paths)
    sample_size, blocks = unet.get("sample_size"), vae.get("block_out_channels")
    if not isinstance(sample_size, int) or not blocks:
        return  # a hub id, or a part whose config does not say: the run checks it once built
    pretrained = str(backbone.get("_target_", "")).endswith(".from_pretrained")
    setting = f"model.backbone.{key}.sample_size"
    problem = resolution_problem(have, sample_size, 2 ** (len(blocks) - 1), pretrained, setting)
    if problem:
        raise ConfigError(problem)


def part_config(node: Any, local_paths: bool = True) -> dict[str, Any]:
    """A model part's config values: the node's own, or for `X.from_pretrained` the local
    folder's config.json with the node's overrides on top ({} for hub ids)."""
    values = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else {}
    if not isinstance(values, dict):
        return {}
    if not str(values.get("_target_", "")).endswith(".from_pretrained"):
        return values
    path, subfolder = values.get("pretrained_model_name_or_path"), values.get("subfolder")
    if not local_paths or not isinstance(path, str):
        return {}
    config = Path(path).expanduser() / (subfolder or "") / "config.json"
    try:
        saved = json.loads(config.read_text())
    except (OSError, ValueError):
        return {}  # not a local folder (a hub id), or unreadable: from_pretrained will say
    return {**saved, **{k: v for k, v in values.items() if not k.startswith("_")}}
