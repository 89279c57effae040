"""Tiny offline feature nets, saved first as a user's would be: a random CLIP (model and
processor, for CLIP-feature FID/KID and CLIP score) and a TorchScript file with the call
convention of FID's Inception."""

from __future__ import annotations

from pathlib import Path

import torch


def save_tiny_clip(out: Path) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from train.models.conditioners.tiny_tokenizers import tiny_clip_tokenizer

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                         num_hidden_layers=2, vocab_size=600, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                           num_hidden_layers=2, image_size=32, patch_size=8),
        projection_dim=16,
    )  # fmt: skip
    CLIPModel(config).eval().save_pretrained(out)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32},
                                         crop_size={"height": 32, "width": 32})  # fmt: skip
    tokenizer = CLIPTokenizer.from_pretrained(tiny_clip_tokenizer())
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return out


class _TinyInception(torch.nn.Module):
    """Inception's TorchScript signature: float [N, 3, 299, 299] in [0, 255] -> features."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 12, kernel_size=7, stride=4)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        h = torch.relu(self.conv(x / 127.5 - 1.0))
        return torch.nn.functional.adaptive_avg_pool2d(h, 1).flatten(1)


def save_tiny_inception(path: Path) -> Path:
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(_TinyInception()), str(path))
    return path
