"""What a conditioner hands a backbone: text hidden states, pooled embeddings, masks, sizes."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

IMAGE_FIELDS = ("sizes", "control", "inpaint")  # from the image: kept under caption dropout


@dataclass(frozen=True)
class Conditioning:
    """One micro-batch's conditioning; a family uses the fields its backbone needs."""

    hidden: torch.Tensor  # [B, L, D] text hidden states (the pipelines' prompt_embeds)
    pooled: torch.Tensor | None = None  # [B, P] pooled text embedding (SDXL, SD3, Flux)
    mask: torch.Tensor | None = None  # [B, L] 1 for real tokens (PixArt, Sana)
    # [B, 6] SDXL micro-conditioning: original size (h, w), crop top-left (y, x), target (h, w)
    sizes: torch.Tensor | None = None
    control: torch.Tensor | None = None  # a ControlNet's control: [B, 3, H, W] in [0, 1] or latents
    # [B, 1 + C, h, w] an inpainting UNet's extra inputs: the mask and the masked image's latents;
    # [B, T + C, F', h, w] an image-to-video model's: the first-frame mask and latents
    inpaint: torch.Tensor | None = None

    def where(self, drop: torch.Tensor, null: Conditioning) -> Conditioning:
        """Rows with `drop` [B] take the null conditioning's (classifier-free guidance
        dropout, Ho & Salimans 2022); the IMAGE_FIELDS are the image's, never dropped."""
        out = {}
        for f in fields(self):
            mine, empty = getattr(self, f.name), getattr(null, f.name)
            if f.name in IMAGE_FIELDS or mine is None or empty is None:
                out[f.name] = mine
                continue
            d = drop.view(-1, *([1] * (mine.ndim - 1)))
            out[f.name] = torch.where(d, empty.to(mine.dtype).expand_as(mine), mine)
        return Conditioning(**out)

    def with_sizes(self, sizes: torch.Tensor | None) -> Conditioning:
        return replace(self, sizes=sizes)

    def with_control(self, control: torch.Tensor | None) -> Conditioning:
        return replace(self, control=control)

    def with_inpaint(self, inpaint: torch.Tensor | None) -> Conditioning:
        return replace(self, inpaint=inpaint)

    def to_dict(self) -> dict[str, torch.Tensor]:
        """The tensors by name (for shards of precomputed embeddings)."""
        return {f.name: v for f in fields(self) if (v := getattr(self, f.name)) is not None}
