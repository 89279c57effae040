"""`ldm-sample`'s image inputs: img2img (``--init-image``, ``--strength``), inpainting
(``--mask``), a ControlNet's control (``--control-image``, ``--control-scale``) and a LoRA
(``--lora``, ``--lora-scale``), each through the diffusers pipeline of the export's family
(``AutoPipelineForImage2Image`` / ``AutoPipelineForInpainting``, the ControlNet pipelines)."""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Any

from train.errors import ConfigError

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline
    from PIL import Image

ADAPTER = "lora"  # the name the sampled LoRA gets in the pipeline
MASK_MODES = ("1", "L", "I", "I;16", "F")  # PIL's single-channel modes


def strength(text: str) -> float:
    """argparse type: an img2img strength, in (0, 1] (the share of the schedule that is run)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(
            f"{value} is outside (0, 1]: 1 repaints everything, small values keep the init image"
        )
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--init-image", help="img2img: start from this image (resized to the model's "
                   "size)")  # fmt: skip
    p.add_argument("--strength", type=strength, default=None,
                   help="img2img / inpainting: how much of the schedule runs, in (0, 1] "
                   "(default: the pipeline's, 0.8 for img2img, 1.0 for inpainting)")  # fmt: skip
    p.add_argument("--mask", help="inpainting: a one-channel image, white where the init image "
                   "is repainted")  # fmt: skip
    p.add_argument("--keep-unmasked", action="store_true", help="inpainting: paste the init "
                   "image back outside the mask (diffusers' apply_overlay, as A1111 does), so "
                   "the pixels not repainted are the input's exactly")  # fmt: skip
    p.add_argument("--mask-blur", type=float, default=0.0, help="with --keep-unmasked: blur the "
                   "pasted mask's edge by this radius in pixels (a softer seam)")  # fmt: skip
    p.add_argument("--control-image", help="a ControlNet export's control image (an edge map, "
                   "a mask, ...; resized to the model's size)")  # fmt: skip
    p.add_argument("--control-scale", type=float, default=None, help="the ControlNet's strength "
                   "(default: as trained, 1.0)")  # fmt: skip
    p.add_argument("--lora", help="a LoRA folder or file (diffusers or kohya format) for the "
                   "export's denoiser")  # fmt: skip
    p.add_argument("--lora-scale", type=float, default=1.0, help="the LoRA's strength (1.0: as "
                   "trained)")  # fmt: skip


def check_arguments(args: argparse.Namespace) -> None:
    """ConfigError for image arguments that cannot work, before torch and diffusers load."""
    if args.mask and not args.init_image:
        raise ConfigError("--mask needs --init-image (the picture whose masked part is repainted)")
    if args.keep_unmasked and not args.mask:
        raise ConfigError("--keep-unmasked applies to inpainting: give --init-image and --mask")
    if args.mask_blur and not args.keep_unmasked:
        raise ConfigError("--mask-blur softens --keep-unmasked's seam: give --keep-unmasked")
    if args.mask_blur < 0:
        raise ConfigError(f"--mask-blur {args.mask_blur}: a radius in pixels, 0 or more")
    if args.strength is not None and not args.init_image:
        raise ConfigError("--strength applies to --init-image: give the image to start from")
    if args.lora_scale != 1.0 and not args.lora:
        raise ConfigError("--lora-scale needs --lora (the LoRA folder or file)")
    if args.control_scale is not None and not args.control_image:
        raise ConfigError("--control-scale needs --control-image (the ControlNet's control)")
    images = (("--init-image", args.init_image), ("--mask", args.mask),
              ("--control-image", args.control_image))  # fmt: skip
    for flag, path in images:
        if path and not Path(path).is_file():
            raise ConfigError(f"{flag} {path} is not a file")
        if path:
            read_image(path, flag, None, mask=flag == "--mask")  # readable, a mask one channel
    if args.lora:
        lora = Path(args.lora)
        has_weights = lora.is_dir() and any(lora.glob("*.safetensors"))
        if not (has_weights or (lora.is_file() and lora.suffix == ".safetensors")):
            raise ConfigError(f"--lora {lora} is neither a .safetensors file nor a folder with "
                              "one (an export's lora/ or lora_kohya/ folder)")  # fmt: skip
        check_lora_kind(lora)


def check_lora_kind(lora: Path) -> None:
    """ConfigError for a LyCORIS file (DoRA, LoHa, LoKr in the kohya layout): diffusers' kohya
    loader drops or refuses those weights, so the images would not be the trained model's."""
    from safetensors import safe_open

    from train.exports.kohya_lora import lycoris_kind

    for file in [lora] if lora.is_file() else sorted(lora.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            kind = lycoris_kind(list(f.keys()))
        if kind:
            raise ConfigError(
                f"--lora {file} is a {kind} in the kohya / LyCORIS layout, which diffusers' "
                "loader does not apply (ComfyUI and A1111 do); sample the run's merged export"
                + (", or --lora its diffusers-lora folder (lora/)" if kind == "DoRA" else "")
            )


def read_image(path: str, flag: str, size: int | None, mask: bool = False) -> Image.Image:
    """The image at `path`, resized to `size` x `size` (None: as it is): RGB, or for a mask its
    one channel."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError) as e:
        raise ConfigError(f"{flag} {path} is not an image PIL can read ({e})") from None
    if mask and image.mode not in MASK_MODES:
        raise ConfigError(
            f"--mask {path} has {len(image.getbands())} channels ({image.mode}); a mask is one "
            "channel, white where the image is repainted: convert it first (e.g. PIL's "
            "image.convert('L'))"
        )
    image = image.convert("L" if mask else "RGB")
    if size is None:
        return image
    return image.resize((size, size), Image.NEAREST if mask else Image.BICUBIC)


def denoiser(pipe: DiffusionPipeline) -> Any:
    """The pipeline's trained model: its UNet, or its transformer."""
    return getattr(pipe, "unet", None) or pipe.transformer


def model_size(pipe: DiffusionPipeline) -> int:
    """The image side the export's denoiser was configured for, in pixels."""
    sample = denoiser(pipe).config.get("sample_size") or getattr(pipe, "default_sample_size", 64)
    return int(sample) * int(pipe.vae_scale_factor)


def image_pipeline(pipe: DiffusionPipeline, args: argparse.Namespace) -> tuple[Any, dict]:
    """The pipeline for the requested mode (the text-to-image one without --init-image), its
    components shared, and the call's image arguments."""
    control = control_kwargs(pipe, args)
    if type(pipe).__name__.endswith("InpaintPipeline") and not (args.init_image and args.mask):
        raise ConfigError(
            f"the export is an inpainting pipeline ({type(pipe).__name__}): give the image and "
            "what to repaint, --init-image IMG --mask MASK"
        )
    if not args.init_image:
        if control and "control_image" not in inspect.signature(pipe.__call__).parameters:
            control["image"] = control.pop("control_image")  # the UNets' ControlNet pipelines
        return pipe, control
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

    auto, mode = (
        (AutoPipelineForInpainting, "inpainting")
        if args.mask
        else (AutoPipelineForImage2Image, "img2img")
    )
    try:
        out = auto.from_pipe(pipe)
    except ValueError as e:
        raise ConfigError(f"{type(pipe).__name__} has no {mode} pipeline in diffusers ({e}); "
                          "sample it from text only") from None  # fmt: skip
    out.set_progress_bar_config(disable=True)
    size = model_size(pipe)
    kwargs: dict[str, Any] = {"image": read_image(args.init_image, "--init-image", size)}
    if args.mask:
        kwargs.update(mask_image=read_image(args.mask, "--mask", size, mask=True),
                      height=size, width=size)  # fmt: skip
    if args.strength is not None:
        kwargs["strength"] = args.strength
    return out, {**kwargs, **control}


def keep_unmasked(pipe: Any, kwargs: dict, images: list, blur: float = 0.0) -> list:
    """The inpainted `images` with the init image pasted back where the mask is black (its
    edge blurred by `blur` px), through the pipeline's own `image_processor.apply_overlay`."""
    mask = kwargs["mask_image"]
    if blur:
        mask = pipe.mask_processor.blur(mask, blur)
    return [pipe.image_processor.apply_overlay(mask, kwargs["image"], im) for im in images]


def control_kwargs(pipe: DiffusionPipeline, args: argparse.Namespace) -> dict[str, Any]:
    """The ControlNet's call arguments (``control_image``, its scale); {} for an export without
    one. ConfigError when the control image and the export do not go together."""
    has_controlnet = getattr(pipe, "controlnet", None) is not None
    if args.control_image and not has_controlnet:
        raise ConfigError(f"--control-image: {type(pipe).__name__} has no ControlNet; give it "
                          "to an export of an experiment=controlnet run")  # fmt: skip
    if not has_controlnet:
        return {}
    if not args.control_image:
        raise ConfigError(f"the export is a ControlNet pipeline ({type(pipe).__name__}): give "
                          "its control image with --control-image IMG")  # fmt: skip
    image = read_image(args.control_image, "--control-image", model_size(pipe))
    scale = 1.0 if args.control_scale is None else args.control_scale
    return {"control_image": image, "controlnet_conditioning_scale": scale}


def apply_lora(pipe: DiffusionPipeline, path: str, scale: float, export: str) -> None:
    """Load the LoRA at `path` into the pipeline's denoiser at strength `scale`; ConfigError when
    it does not fit (another family or shape: no or mismatched keys)."""
    model = denoiser(pipe)
    name = type(model).__name__
    if not hasattr(pipe, "load_lora_weights"):
        raise ConfigError(f"{type(pipe).__name__} cannot load LoRAs in diffusers; sample a "
                          "merged export instead (ldm-export --format merged)")  # fmt: skip
    try:
        pipe.load_lora_weights(path, adapter_name=ADAPTER)
    except (ValueError, RuntimeError, KeyError) as e:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise ConfigError(f"--lora {path} does not fit {export}'s {name}: {first}") from None
    if ADAPTER not in (getattr(model, "peft_config", None) or {}):
        raise ConfigError(f"--lora {path} holds no weights for {export}'s {name}: it was "
                          "trained for another model family")  # fmt: skip
    pipe.set_adapters([ADAPTER], adapter_weights=[scale])
