"""Feature extractors for FID and KID: each maps uint8 images [N, 3, H, W] to float32 [N, D].

torchmetrics computes FID/KID over any `nn.Module` with that contract (it probes it with one
299x299 uint8 image to learn D). Its built-in Inception comes from torch-fidelity, which
downloads weights at first use; these take weights from a local file or folder instead.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# CLIP's image normalisation (openai/CLIP, the same in transformers' CLIPImageProcessor).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _local_file(path: str | Path, what: str, hint: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{what} {p} does not exist; {hint}")
    return p


class TorchScriptInception(nn.Module):
    """FID's Inception-v3 (TF weights of 2015-12-05) from a local TorchScript file, called as
    clean-fid and StyleGAN3's metrics call it, so the FID is comparable with published ones.

    The file is `inception-2015-12-05.pt` (clean-fid's `InceptionV3W` download); it takes
    float images in [0, 255] at 299x299 and ``return_features=True`` gives the 2048-d pool.
    """

    def __init__(self, path: str, size: int = 299) -> None:
        super().__init__()
        hint = "download inception-2015-12-05.pt once (clean-fid's URL) and give its path"
        self.path = str(_local_file(path, "Inception TorchScript file", hint))
        self.net = torch.jit.load(self.path, map_location="cpu").eval()
        self.size = size
        self.requires_grad_(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.float(), size=(self.size, self.size), mode="bilinear",
                          align_corners=False)  # fmt: skip
        return self.net(x, return_features=True).reshape(len(images), -1).float()

    def describe(self) -> str:
        return f"inception-torchscript:{Path(self.path).name}"


class ClipImageFeatures(nn.Module):
    """CLIP image embeddings (a `CLIPModel` or `CLIPVisionModelWithProjection` folder or hub id)
    as FID/KID features: FD over CLIP features tracks human judgement better than Inception's
    (Kynkäänniemi et al. 2023) and needs no separate download when CLIP score runs anyway."""

    def __init__(self, model_name_or_path: str) -> None:
        super().__init__()
        from transformers import AutoConfig, CLIPModel, CLIPVisionModelWithProjection

        local = Path(model_name_or_path).expanduser()
        if model_name_or_path.startswith((".", "/", "~")) and not local.is_dir():
            raise FileNotFoundError(
                f"CLIP model folder {local} does not exist; give a folder written by "
                "save_pretrained or a hub id such as openai/clip-vit-large-patch14"
            )
        self.name = model_name_or_path
        config = AutoConfig.from_pretrained(model_name_or_path)
        if config.model_type == "clip":  # a whole CLIPModel: its vision tower and projection
            self.model = CLIPModel.from_pretrained(model_name_or_path).eval()
            self.size = int(config.vision_config.image_size)
        else:
            self.model = CLIPVisionModelWithProjection.from_pretrained(model_name_or_path).eval()
            self.size = int(config.image_size)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().div(255.0)
        x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False)
        x = (x.clamp(0, 1) - self.mean) / self.std
        if not hasattr(self.model, "get_image_features"):
            return self.model(pixel_values=x).image_embeds.float()
        out = self.model.get_image_features(pixel_values=x)
        # transformers >= 5 returns an output whose pooler_output is the projected embedding.
        return (out if isinstance(out, torch.Tensor) else out.pooler_output).float()

    def describe(self) -> str:
        return f"clip:{self.name}"


def describe(feature: nn.Module) -> str:
    """What reference statistics record about the extractor that made them: its own
    description, else its class and a hash of its weights (two nets of one class differ)."""
    if hasattr(feature, "describe"):
        return feature.describe()
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(feature.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return f"{type(feature).__module__}.{type(feature).__qualname__}:{digest.hexdigest()[:16]}"
