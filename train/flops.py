"""Model FLOPs for throughput accounting (MFU), counted once per micro-batch shape.

Counted with PyTorch's FlopCounterMode (through Lightning's `measure_flops`) on a meta-device
copy of the UNet, so counting allocates nothing and takes milliseconds. MFU then counts the
trained model's forward + backward only; the frozen VAE and text encoder forwards are work the
GPU does but not model FLOPs, as in the usual MFU definition (Chowdhery et al. 2022).
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from lightning.fabric.utilities.throughput import measure_flops


def unet_train_flops(
    unet: UNet2DConditionModel,
    batch_size: int,
    latent_shape: tuple[int, ...],
    context_shape: tuple[int, ...],
) -> int:
    """FLOPs of the UNet's forward + backward on one micro-batch (not quite linear in the
    batch size, so counted for the batch size used).

    latent_shape: [C, h, w]; context_shape: [L, D] (text hidden states).
    """
    with torch.device("meta"):
        model = UNet2DConditionModel.from_config(unet.config)
        x = torch.empty(batch_size, *latent_shape)
        t = torch.zeros(batch_size, dtype=torch.long)
        context = torch.empty(batch_size, *context_shape)
    return measure_flops(
        model,
        lambda: model(x, t, encoder_hidden_states=context).sample,
        loss_fn=torch.Tensor.sum,
    )
