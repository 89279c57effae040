"""strategy=fsdp2 in one process (a one-rank gloo group): which modules become FSDP2 units, what
stays whole, and the mixed-precision policy. Two-process training, resume and export against one
process are in test_distributed.py and test_adapters_sharded.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from hydra.utils import instantiate
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from train.config.compose import compose
from train.distributed.fsdp2 import FSDP2Strategy, reshard
from train.errors import ConfigError
from train.models.conditioning import Conditioning
from train.models.unwrap import model_class


@pytest.fixture
def one_rank(tmp_path: Path):
    """A one-rank process group and mesh, removed after the test."""
    from torch.distributed.device_mesh import init_device_mesh

    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,), mesh_dim_names=("shard",))
    finally:
        torch.distributed.destroy_process_group()


def sharded_tiny(mesh, **options) -> torch.nn.Module:
    torch.manual_seed(0)
    module = instantiate(compose(["experiment=tiny"]).model)
    strategy = FSDP2Strategy(**options)
    strategy._device_mesh, strategy.parallel_devices = mesh, [torch.device("cpu")]
    return strategy._setup_model(module)


def test_each_block_is_a_unit_and_the_frozen_parts_stay_whole(one_rank) -> None:
    module = sharded_tiny(one_rank)
    model = module.trainable
    blocks = [m for m in model.modules() if isinstance(m, (ResnetBlock2D, Transformer2DModel))]
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    assert len(units) == len(blocks) + 1 and model in units  # the blocks and the root
    assert all(isinstance(p, DTensor) for p in model.parameters())
    # The VAE and text encoder are not the module's children: never sharded, whole on each rank.
    assert not any(isinstance(p, DTensor) for p in module.vae.parameters())
    # What exports and plain copies build from is the diffusers class, not FSDP2's subclass.
    assert type(model).__name__ == "FSDPUNet2DConditionModel"
    assert model_class(model).__name__ == "UNet2DConditionModel"


def test_the_mixed_precision_policy_computes_in_bf16_over_fp32_shards(one_rank) -> None:
    module = sharded_tiny(one_rank, param_dtype="bfloat16", reduce_dtype="float32")
    model, cfg = module.trainable, module.trainable.config
    x = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    cond = Conditioning(hidden=torch.randn(2, 8, cfg.cross_attention_dim))
    out = module.backbone.predict(model, x, torch.tensor([10.0, 700.0]), cond)
    assert out.dtype == torch.bfloat16  # gathered weights and compute in bf16
    out.float().square().mean().backward()
    reshard(model)
    params = list(model.parameters())
    assert {p.dtype for p in params} == {torch.float32}  # master weights stay float32
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)


def test_a_dtype_that_is_not_one_is_refused() -> None:
    with pytest.raises(ConfigError, match="'bf16' is not a torch dtype; use bfloat16"):
        FSDP2Strategy(param_dtype="bf16")
