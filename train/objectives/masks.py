"""Random inpainting masks and the masked loss: pure tensor functions of per-sample draws.

Masks are drawn from the step's per-sample generators (train/tasks/rng.py), like the noise, so a
resumed or re-sharded run trains on the same masks. Mask convention (diffusers' inpainting
pipelines): 1 where the image is repainted, 0 where it is kept.
"""

from __future__ import annotations

import torch

from train.objectives.base import Draws

STROKE_POINTS = 4  # a stroke is a polyline through this many random points
DRAWS = 6 + 2 * STROKE_POINTS  # uniforms per sample: kind, box (4), stroke width, stroke points


class RandomMasks:
    """A mix of masks like LaMa's and SD-inpainting's training masks (Suvorov et al. 2022): a
    random box, a thick random stroke, or the whole image (then the model also learns plain
    text-to-image, which the inpainting pipeline runs at strength 1 with a full mask)."""

    def __init__(
        self,
        box: float = 0.5,
        stroke: float = 0.25,
        full: float = 0.25,
        min_side: float = 0.2,
        max_side: float = 0.7,
        stroke_width: tuple[float, float] = (0.08, 0.2),
    ) -> None:
        """The kinds' shares (`box`, `stroke`, `full`: normalised to sum to 1); box sides and
        stroke widths as fractions of the image side."""
        total = box + stroke + full
        if total <= 0 or min(box, stroke, full) < 0:
            raise ValueError("masks: box, stroke and full are shares >= 0 with a positive sum")
        self.box, self.full = box / total, full / total
        self.min_side, self.max_side = min_side, max_side
        self.stroke_width = tuple(stroke_width)

    def draw(self, rng: Draws, height: int, width: int) -> torch.Tensor:
        """Masks [B, 1, height, width] in {0, 1}, one per sample of `rng`."""
        u = torch.special.ndtr(rng.randn((DRAWS,)))  # [B, DRAWS] uniforms from normals
        ys = (torch.arange(height, device=u.device) + 0.5) / height
        xs = (torch.arange(width, device=u.device) + 0.5) / width
        grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1)  # [H, W, 2] (y, x)
        box = box_masks(u[:, 1:5], grid, self.min_side, self.max_side)
        lo, hi = self.stroke_width
        stroke = stroke_masks(
            u[:, 6:].reshape(-1, STROKE_POINTS, 2), lo + (hi - lo) * u[:, 5], grid
        )
        kind = u[:, 0].view(-1, 1, 1)
        masks = torch.where(kind < self.full, torch.ones_like(box),
                            torch.where(kind < self.full + self.box, box, stroke))  # fmt: skip
        return masks.unsqueeze(1).float()


def box_masks(u: torch.Tensor, grid: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """[B, H, W] boxes from uniforms u [B, 4] (centre y, x; height, width)."""
    size = lo + (hi - lo) * u[:, 2:4]  # [B, 2]
    centre = size / 2 + (1 - size) * u[:, 0:2]  # inside the image
    inside = (grid[None] - centre[:, None, None]).abs() < size[:, None, None] / 2
    return inside.all(dim=-1).float()


def stroke_masks(points: torch.Tensor, width: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """[B, H, W] polylines through points [B, K, 2] (y, x in [0, 1]) of `width` [B]."""
    a, b = points[:, :-1], points[:, 1:]  # segments [B, K-1, 2]
    p = grid.reshape(1, 1, -1, 2)  # [1, 1, HW, 2]
    ab = (b - a)[:, :, None]
    t = ((p - a[:, :, None]) * ab).sum(-1) / (ab * ab).sum(-1).clamp_min(1e-8)
    nearest = a[:, :, None] + t.clamp(0, 1)[..., None] * ab
    dist = (p - nearest).norm(dim=-1).amin(dim=1)  # [B, HW]
    return (dist < width[:, None] / 2).float().reshape(-1, *grid.shape[:2])


def masked_mse(
    prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """MSE over the masked latents only, each sample's sum divided by its mask's area, so a
    small mask weighs as much as a large one (kohya sd-scripts #589: a plain mean over all pixels
    scales the loss with the mask's size). mask: [B, 1, h, w] at the latents' size."""
    m = mask.float().expand_as(prediction)
    err = (prediction.float() - target.float()) ** 2 * m
    per_sample = err.sum(dim=(1, 2, 3)) / m.sum(dim=(1, 2, 3)).clamp_min(1.0)
    return (per_sample * weights).mean()
