"""End-to-end on CPU: shards -> training -> checkpoints -> export -> diffusers pipeline."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from train.cli.export import export_checkpoint
from train.cli.run import run
from train.distributed.sharding import load_any_checkpoint as load_checkpoint


def tiny(compose, shards: Path, *overrides: str):
    return compose("experiment=tiny", f"data.urls={shards}", "logger=none", *overrides)


@pytest.fixture
def trained(tiny_run):
    """The session's tiny run (only read here)."""
    return tiny_run


def test_run_writes_checkpoints_and_a_loadable_export(trained):
    run_dir, cfg = trained
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in ckpts and "step_0000004.ckpt" in ckpts
    export = run_dir / "export"
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (export / part).is_dir(), part
    assert list((export / "unet").glob("*.safetensors"))
    assert not list(export.rglob("*.bin")), "exports must be safetensors only"

    pipe = StableDiffusionPipeline.from_pretrained(export, use_safetensors=True)
    assert type(pipe.text_encoder).__name__ == "BertModel"
    out = pipe(
        ["a red circle in the center on a white background"] * 2,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert out.shape == (2, cfg.data.resolution, cfg.data.resolution, 3)
    assert out.min() >= 0.0 and out.max() <= 1.0 and out.std() > 0


def test_exported_unet_equals_checkpoint_weights(trained):
    run_dir, _ = trained
    state = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["state_dict"]
    exported = load_file(next((run_dir / "export" / "unet").glob("*.safetensors")))
    unet_state = {k.removeprefix("backbone.model."): v for k, v in state.items()
                  if k.startswith("backbone.model.")}  # fmt: skip
    assert unet_state.keys() == exported.keys()
    for k, v in unet_state.items():
        assert torch.equal(v, exported[k]), k
    assert not any(k.startswith(("vae.", "text_encoder.")) for k in state), "frozen parts stay out"


def test_ldm_export_cli_reproduces_the_export(trained, tmp_path):
    """`ldm-export CKPT` writes what the end of training wrote, every tensor of every part: the
    frozen VAE built from config (random init in the tiny configs) included, twice over."""
    run_dir, _ = trained
    exports = [export_checkpoint(run_dir / "checkpoints" / "last.ckpt", tmp_path / f"again{i}")
               for i in range(2)]  # fmt: skip
    files = sorted(p.relative_to(run_dir / "export") for p in
                   (run_dir / "export").rglob("*.safetensors"))  # fmt: skip
    assert {f.parts[0] for f in files} == {"unet", "vae", "text_encoder"}
    for out in exports:
        assert sorted(p.relative_to(out) for p in out.rglob("*.safetensors")) == files
        for f in files:
            a, b = load_file(run_dir / "export" / f), load_file(out / f)
            assert a.keys() == b.keys(), f
            assert all(torch.equal(a[k], b[k]) for k in a), f


def test_resume_from_last_continues_at_the_saved_step(trained, compose, demo_shards, tmp_path):
    run_dir, cfg = trained
    # A copy of the run's folder: the session's run stays as it is for the other tests.
    root = tmp_path / "resumed"
    shutil.copytree(Path(cfg.paths.root) / "runs", root / "runs")
    copied = root / "runs" / run_dir.name
    cfg2 = compose(
        "experiment=tiny",
        f"paths.root={root}",
        f"data.urls={demo_shards}",
        "ckpt_path=last",
        "trainer.max_steps=6",
        "logger=none",  # resume into MLflow: test_mlflow_tracking.py
    )
    assert load_checkpoint(copied / "checkpoints" / "last.ckpt")["global_step"] == 4
    run(cfg2)
    ckpt = load_checkpoint(copied / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 6
    assert (copied / "checkpoints" / "step_0000006.ckpt").exists()
    # The checkpoint names the folder it was written in; a moved run still writes last.ckpt.
    assert not list((copied / "checkpoints").glob("last-v*")), "stale last.ckpt left behind"


def test_fresh_start_refuses_to_overwrite_an_existing_run(trained, compose, demo_shards):
    _, cfg = trained
    from train.errors import ConfigError

    cfg2 = compose(
        "experiment=tiny", f"paths.root={Path(cfg.paths.root)}", f"data.urls={demo_shards}"
    )
    with pytest.raises(ConfigError, match="ckpt_path=last"):
        run(cfg2)


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def test_a_refused_start_writes_nothing_into_the_run(demo_shards, tmp_path):
    """`ldm-train` refused (a fresh start over a run's checkpoints) leaves every file of that
    run as it was: Hydra's .hydra/*.yaml used to be rewritten before the check ran."""
    from cli_runner import run_cli

    from train.cli.train import main

    argv = ["ldm-train", "experiment=tiny", f"data.urls={demo_shards}", "logger=none",
            "trainer.max_steps=2"]  # fmt: skip
    env = {**os.environ, "LDM_OUTPUT_DIR": str(tmp_path)}
    assert run_cli(main, argv, env=env).returncode == 0
    run_dir = tmp_path / "runs" / "tiny"
    overrides = (run_dir / ".hydra" / "overrides.yaml").read_text()
    assert "trainer.max_steps=2" in overrides and "seed=5" not in overrides
    before = snapshot(run_dir)

    refused = run_cli(main, [*argv, "seed=5"], env=env)
    assert refused.returncode == 2
    assert "already holds checkpoints" in refused.stderr and "ckpt_path=last" in refused.stderr
    assert snapshot(run_dir) == before
