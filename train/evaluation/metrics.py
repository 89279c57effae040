"""FID, KID and CLIP score of generated images (torchmetrics), against reference features of
real images computed once per set (`train.evaluation.reference`)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def clip_loader(model_name_or_path: str):
    """A loader for torchmetrics' CLIPScore: a CLIPModel and CLIPProcessor from a folder or hub
    id. (Given the string itself, torchmetrics picks loaders by the name's prefix.)"""
    local = Path(model_name_or_path).expanduser()
    if model_name_or_path.startswith((".", "/", "~")) and not local.is_dir():
        raise FileNotFoundError(
            f"CLIP model folder {local} does not exist; give a folder holding a CLIPModel and its "
            "CLIPProcessor (save_pretrained) or a hub id such as openai/clip-vit-large-patch14"
        )

    def load():
        from transformers import CLIPProcessor

        model = _clip_with_tensor_features().from_pretrained(model_name_or_path).eval()
        return model, CLIPProcessor.from_pretrained(model_name_or_path)

    return load


def _clip_with_tensor_features() -> type:
    """CLIPModel whose get_*_features return the embedding tensor: transformers >= 5 returns an
    output object (pooler_output), which torchmetrics 1.9's CLIPScore cannot read
    (Lightning-AI/torchmetrics#3407, fixed after 1.9.0)."""
    from transformers import CLIPModel

    class CLIPTensorFeatures(CLIPModel):
        def get_image_features(self, *args, **kwargs) -> torch.Tensor:
            return _tensor(super().get_image_features(*args, **kwargs))

        def get_text_features(self, *args, **kwargs) -> torch.Tensor:
            return _tensor(super().get_text_features(*args, **kwargs))

    return CLIPTensorFeatures


def _tensor(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ImageMetrics(nn.Module):
    """FID and KID over ``feature``'s embeddings (reference features as the real side) and,
    with ``clip_model``, CLIP score between images and their prompts.

    ``update`` takes uint8 images [N, 3, H, W]. Under torch.distributed each rank passes its
    share of the reference features and of the images; torchmetrics sums (FID, CLIP) or gathers
    (KID) the states in ``compute``, so every rank gets the numbers of the whole sets.
    """

    def __init__(
        self,
        feature: nn.Module,
        reference: torch.Tensor,
        clip_model: str | None = None,
        kid_subset_size: int = 100,
    ) -> None:
        super().__init__()
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance
        from torchmetrics.multimodal.clip_score import CLIPScore

        if reference.ndim != 2 or len(reference) < 1:
            raise ValueError(f"reference features must be [N >= 1, D], got {list(reference.shape)}")
        self.fid = FrechetInceptionDistance(feature=feature, reset_real_features=False)
        self.kid = KernelInceptionDistance(feature=feature, subset_size=kid_subset_size,
                                           reset_real_features=False)  # fmt: skip
        self.clip = CLIPScore(model_name_or_path=clip_loader(clip_model)) if clip_model else None
        self.kid_subset_size = kid_subset_size
        self.num_reference = len(reference)
        self._set_reference(reference.double())

    def _set_reference(self, feats: torch.Tensor) -> None:
        # torchmetrics has no API for precomputed real statistics; these are the states its
        # `update(real=True)` accumulates from the same features.
        self.fid.real_features_sum = feats.sum(dim=0)
        self.fid.real_features_cov_sum = feats.t().mm(feats)
        self.fid.real_features_num_samples = torch.tensor(len(feats), dtype=torch.long)
        self.kid.real_features = [feats.float()]

    def update(self, images: torch.Tensor, prompts: list[str] | None = None) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            got = f"{images.dtype} {list(images.shape)}"
            raise ValueError(f"images must be uint8 [N, 3, H, W], got {got}")
        self.fid.update(images, real=False)
        self.kid.update(images, real=False)
        if self.clip is not None:
            if prompts is None or len(prompts) != len(images):
                raise ValueError("CLIP score needs one prompt per image")
            self.clip.update(images, prompts)

    def reset(self) -> None:
        """Forget the generated images; the reference features stay (reset_real_features)."""
        self.fid.reset()
        self.kid.reset()
        if self.clip is not None:
            self.clip.reset()

    def compute(self) -> dict[str, float]:
        """{"fid", "kid", "kid_std", "clip_score"}: one number each over every rank's images."""
        counts = torch.tensor([int(self.fid.fake_features_num_samples), self.num_reference],
                              device=self.fid.fake_features_sum.device)  # NCCL: on device
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
        fakes, reals = counts.tolist()
        # KID averages an MMD over random subsets; they cannot be larger than either side.
        self.kid.subset_size = max(2, min(self.kid_subset_size, fakes, reals))
        with torch.random.fork_rng(devices=[]):  # KID's subsets: the same on any world size
            torch.manual_seed(0)
            kid_mean, kid_std = self.kid.compute()
        out = {"fid": float(self.fid.compute()), "kid": float(kid_mean),
               "kid_std": float(kid_std)}  # fmt: skip
        if self.clip is not None:
            out["clip_score"] = float(self.clip.compute())
        return out
