"""Model FLOPs for throughput accounting (MFU), counted once per micro-batch shape.

Counted with PyTorch's FlopCounterMode (through Lightning's `measure_flops`) on a meta-device
copy of the backbone's model, so counting allocates nothing and takes milliseconds. MFU then
counts the trained model's forward + backward only; the frozen VAE and text encoder forwards are
work the GPU does but not model FLOPs, as in the usual MFU definition (Chowdhery et al. 2022).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.fabric.utilities.throughput import measure_flops

from train.models.conditioning import Conditioning
from train.models.unwrap import model_class


def train_flops(backbone: Any, batch_size: int, latent: tuple[int, ...], cond: Conditioning) -> int:
    """FLOPs of the backbone's forward + backward on one micro-batch (not quite linear in the
    batch size, so counted for the batch size used). latent: [C, h, w]."""
    with torch.device("meta"):
        model = model_class(backbone.model).from_config(backbone.model.config)
        x = torch.empty(batch_size, *latent)
        t = torch.zeros(batch_size)
        fake = {k: torch.empty(batch_size, *v.shape[1:], dtype=v.dtype)
                for k, v in cond.to_dict().items()}  # fmt: skip
    meta_cond = Conditioning(**fake)
    with torch.enable_grad():  # the backward is counted too, also when called under no_grad
        return measure_flops(
            model, lambda: backbone.predict(model, x, t, meta_cond), loss_fn=torch.Tensor.sum
        )
