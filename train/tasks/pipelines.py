"""The family's diffusers pipeline over a LatentDiffusion's parts: previews and exports.

The backbone names the pipeline class and its component name, the conditioner its text
encoders and tokenizers, the objective its schedulers; this module only puts them together.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import diffusers
import torch
from PIL import Image

from train.errors import ConfigError
from train.exports import kohya_lora
from train.models import adapters
from train.tasks.clips import Clips
from train.util import atomic_dir, image_grid


def scheduler_of(objective: Any, name: str) -> Any:
    return getattr(diffusers, name).from_config(objective.scheduler_config())


def build(
    module: Any, scheduler: Any = None, model: torch.nn.Module | None = None, merge: bool = False
) -> Any:
    """The pipeline (components shared, not copied); `model` replaces the trained one;
    ``merge``: a text encoder with an adapter as a merged copy (what an export writes)."""
    backbone = module.backbone
    text = module.conditioner.pipeline_parts()
    if merge:
        text.update({k: adapters.merged(v) for k, v in text_adapters(module).items()})
    parts = {
        backbone.component: model if model is not None else backbone.model,
        "vae": module.vae,
        **text,
        **backbone.frozen_parts(),
        "scheduler": scheduler
        or scheduler_of(module.objective, module.objective.preview_scheduler),
        **backbone.pipeline_extras(),
    }
    pipe = getattr(diffusers, backbone.pipeline_class)(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(
    module: Any,
    prompts: list[str],
    generator: torch.Generator | list[torch.Generator],
    steps: int,
    guidance_scale: float,
    model: torch.nn.Module | None = None,
    output_type: str = "pil",
    batch: dict | None = None,
) -> Any:
    """Images for `prompts` at the trained size (the trained model in eval mode meanwhile):
    PIL images, or with ``output_type="pt"`` a float tensor [N, 3, H, W] in [0, 1]; a video
    model's clips: lists of PIL frames, or [N, F, 3, H, W]. ``batch``:
    a training batch, for the image inputs a backbone samples from (ControlNet, inpainting)."""
    trained = module.trainable
    was_training = trained.training
    trained.eval()
    images = module.backbone.sample_inputs(batch, len(prompts))
    try:
        size = module.resolution
        out = build(module, model=model)(
            prompt=prompts,  # by name: WanImageToVideoPipeline takes `image` first
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=generator,
            output_type=output_type,
            height=size,
            width=size,
            **images,
            **module.backbone.pipeline_call_kwargs(),
            **getattr(module.conditioner, "pipeline_call_kwargs", dict)(),
        )
        return out.frames if hasattr(out, "frames") else out.images  # video pipelines: frames
    finally:
        trained.train(was_training)


def preview(
    module: Any,
    prompts: list[str],
    seed: int,
    steps: int,
    guidance_scale: float,
    model: torch.nn.Module | None = None,
    batch: dict | None = None,
) -> Image.Image | Clips:
    """A grid of samples for `prompts`, or a video model's clips (``batch``: the image inputs'
    source, see generate)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    images = generate(module, prompts, generator, steps, guidance_scale, model, batch=batch)
    if getattr(module.backbone, "video", False):
        return Clips(images, module.backbone.fps)
    return image_grid(images)


def export(module: Any, out_dir: str | Path, model: torch.nn.Module | None = None) -> Path:
    """Write the diffusers folder (safetensors) with the objective's export scheduler;
    replaces `out_dir` atomically. A model (and a text encoder) with an adapter is written
    merged into its base."""
    scheduler = scheduler_of(module.objective, module.objective.export_scheduler)
    model = model if model is not None else module.trainable
    if adapters.has_adapter(model):
        model = adapters.merged(model)
    with atomic_dir(out_dir) as tmp:
        save_pipeline(build(module, scheduler, model, merge=True), tmp)
    return Path(out_dir)


def save_pipeline(pipe: Any, folder: str | Path) -> None:
    """`pipe.save_pretrained` (safetensors), plus what an export holds beside the pipeline's own
    folders: a motion UNet's modules alone (motion_adapter/). Every export goes through here:
    the run's and ldm-export's (which rebuilds the pipeline without a backbone)."""
    from train.models.backbones.motion import save_motion_adapter

    pipe.save_pretrained(folder, safe_serialization=True)
    for part in pipe.components.values():
        save_motion_adapter(part, folder)


def text_adapters(module: Any) -> dict[str, torch.nn.Module]:
    """The text encoders whose adapter trains (a text-encoder LoRA), by pipeline name."""
    conditioner = getattr(module, "trained_conditioner", None)
    parts = conditioner.pipeline_parts() if conditioner is not None else {}
    return {name: part for name, part in parts.items()
            if isinstance(part, torch.nn.Module) and adapters.has_adapter(part)}  # fmt: skip


def lora_format_problem(module: Any, model: torch.nn.Module | None = None) -> str | None:
    """Why `model` (default: the trained one) cannot be written in diffusers' LoRA format, or
    None when it can (LoHa and LoKr adapters, and families without a LoRA loader, cannot)."""
    model = model if model is not None else module.trainable
    if not adapters.has_adapter(model):
        return "the model has no adapter (model.backbone.adapter)"
    if getattr(module.backbone, "trains_besides_adapter", False):
        return f"{type(module.backbone).__name__} trains more than its adapter"
    pipeline = module.backbone.pipeline_class
    if not hasattr(getattr(diffusers, pipeline), "save_lora_weights"):
        return f"{pipeline} has no LoRA format in diffusers"
    holds = inspect.signature(getattr(diffusers, pipeline).save_lora_weights).parameters
    for name in text_adapters(module):
        if f"{name}_lora_layers" not in holds:  # e.g. SD3's T5, text_encoder_3
            return f"diffusers' {pipeline} LoRA format holds no {name} adapter"
    for part in (model, *text_adapters(module).values()):
        if not adapters.is_lora(part):
            kind = type(adapters.adapter_config(part)).__name__
            return f"diffusers' LoRA format holds LoRA and DoRA adapters only, not {kind}"
    return None


def export_lora(module: Any, out_dir: str | Path, model: torch.nn.Module | None = None) -> Path:
    """Write the trained LoRA in diffusers' format (``pytorch_lora_weights.safetensors`` with the
    adapter's config in its metadata), which the family pipeline's ``load_lora_weights`` reads
    with the trained rank and alpha; replaces `out_dir` atomically."""
    model = model if model is not None else module.trainable
    problem = lora_format_problem(module, model)
    if problem:
        raise ConfigError(f"{problem}; export the merged model instead (the run's export folder)")
    pipeline = getattr(diffusers, module.backbone.pipeline_class)
    name = module.backbone.component
    layers = {
        f"{name}_lora_layers": adapters.adapter_state(model),
        f"{name}_lora_adapter_metadata": adapters.adapter_metadata(model),
    }
    for part, text in text_adapters(module).items():  # load_lora_weights restores these too
        layers[f"{part}_lora_layers"] = adapters.adapter_state(text)
        layers[f"{part}_lora_adapter_metadata"] = adapters.adapter_metadata(text)
    with atomic_dir(out_dir) as tmp:
        pipeline.save_lora_weights(tmp, **layers, safe_serialization=True)
    return Path(out_dir)


KOHYA_FILE = "lora.safetensors"


def kohya_format_problem(module: Any, model: torch.nn.Module | None = None) -> str | None:
    """Why `model` (default: the trained one) has no kohya / A1111 / ComfyUI LoRA file, or None
    when it has one (UNet families' LoRAs; ComfyUI reads SD3's and Flux's diffusers-lora)."""
    if getattr(module.backbone, "trains_besides_adapter", False):
        return f"{type(module.backbone).__name__} trains more than its adapter"
    if module.backbone.component != "unet":
        return (f"the kohya format is for UNet LoRAs; ComfyUI loads a {module.backbone.component}"
                " LoRA in the diffusers-lora format")  # fmt: skip
    for text in text_adapters(module).values():
        problem = kohya_lora.text_encoder_problem(text)
        if problem:
            return problem
    return kohya_lora.kohya_problem(model if model is not None else module.trainable)


def export_kohya(module: Any, out_dir: str | Path, model: torch.nn.Module | None = None) -> Path:
    """Write the trained LoRA as one kohya-layout file, `out_dir`/lora.safetensors, for A1111's
    and ComfyUI's lora folders (diffusers' ``load_lora_weights`` reads it too); replaces `out_dir`
    atomically."""
    from safetensors.torch import save_file

    model = model if model is not None else module.trainable
    problem = kohya_format_problem(module, model)
    if problem:
        raise ConfigError(f"{problem}; export --format diffusers-lora or merged instead")
    state = kohya_lora.kohya_state(model)
    texts = text_adapters(module)
    for part, text in texts.items():
        state.update(kohya_lora.kohya_state(text, kohya_lora.text_prefix(text, part, len(texts))))
    meta = kohya_lora.kohya_metadata(model, getattr(module, "base", None))
    with atomic_dir(out_dir) as tmp:
        save_file(state, str(tmp / KOHYA_FILE), metadata=meta)
    return Path(out_dir)
