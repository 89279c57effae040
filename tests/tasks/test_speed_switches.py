"""Speed switches (train/callbacks/speed.py) keep the model's values: torch.compile per block and
channels_last give the plain model's outputs and gradients, keep its parameter names, and a
training run with them logs the plain run's losses. Their speed-ups are measured by
benchmarks/speed_switches.py, not here."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from hydra.utils import instantiate

from train.callbacks.speed import attention_report, compile_blocks, to_channels_last
from train.config.compose import compose
from train.models.conditioning import Conditioning


def tiny_backbone():
    torch.manual_seed(0)
    return instantiate(compose(["experiment=tiny"]).model.backbone)


def loss_and_grads(backbone) -> tuple[float, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    cfg = backbone.model.config
    x = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    cond = Conditioning(hidden=torch.randn(2, 8, cfg.cross_attention_dim, generator=g))
    t = torch.tensor([10.0, 700.0])
    loss = backbone.predict(backbone.model, x, t, cond).square().mean()
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in backbone.model.named_parameters()}


@pytest.mark.parametrize("switch", ["compile", "channels_last"])
def test_a_switch_keeps_outputs_gradients_and_names(switch: str) -> None:
    plain = tiny_backbone()
    fast = copy.deepcopy(plain)
    if switch == "compile":
        blocks = compile_blocks(fast.model, plain.wrap_units(), {})
        kinds = (ResnetBlock2D, Transformer2DModel)
        assert blocks == sum(isinstance(m, kinds) for m in plain.model.modules()) > 0
    else:
        to_channels_last(fast.model)
        conv = fast.model.conv_in.weight
        assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert list(fast.model.state_dict()) == list(plain.model.state_dict())
    ref_loss, ref_grads = loss_and_grads(plain)
    loss, grads = loss_and_grads(fast)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, rtol=1e-4, atol=1e-6, msg=name)


def test_the_attention_report_names_processors_and_the_sdpa_kernel() -> None:
    from diffusers.models.attention_processor import AttnProcessor

    model = tiny_backbone().model
    report = attention_report(model, torch.device("cpu"), torch.bfloat16)
    # The tiny UNet: 4 Transformer2DModel blocks, each with self- and cross-attention.
    kernels = ("flash_attention", "efficient_attention", "cudnn_attention", "math", "overrideable")
    assert report.startswith("attention: 8 x AttnProcessor2_0; SDPA kernel for 8 heads of 4 in "
                             "bfloat16 on cpu: "), report  # fmt: skip
    assert report.rsplit(": ", 1)[1] in kernels, report
    model.set_attn_processor(AttnProcessor())  # diffusers' classic processor: no SDPA
    assert attention_report(model, torch.device("cpu"), torch.float32).startswith(
        "attention: 8 x AttnProcessor; ")


def loss_history(root: Path) -> list[float]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    (experiment,) = [e for e in client.search_experiments() if e.name == "tiny"]
    (run,) = client.search_runs([experiment.experiment_id])
    return [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train/loss"),
                                    key=lambda m: m.step)]  # fmt: skip


@pytest.mark.slow
def test_a_run_with_every_switch_logs_the_plain_runs_losses_and_exports(
    tiny_run, demo_shards: Path, tmp_path: Path
) -> None:
    from train.cli.train import main

    _, plain_cfg = tiny_run
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    argv = ["ldm-train", f"paths.root={tmp_path}", "experiment=tiny", f"data.urls={demo_shards}",
            "callbacks.speed.compile_blocks=true", "callbacks.speed.channels_last=true",
            # Dynamo's capture and AOT autograd as Inductor gets them, without its C++ codegen
            # (a minute here; the test above runs Inductor itself).
            "+callbacks.speed.compile_options.backend=aot_eager"]  # fmt: skip
    proc = run_cli(main, argv, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    plain, fast = loss_history(Path(plain_cfg.paths.root)), loss_history(tmp_path)
    assert len(fast) == len(plain) == 4
    assert fast == pytest.approx(plain, rel=1e-4)
    assert (tmp_path / "runs" / "tiny" / "export" / "unet" / "config.json").is_file()
