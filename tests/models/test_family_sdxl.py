"""The SDXL family on CPU: the two-encoder conditioner against the pipeline's encode_prompt, a
tiny run and its export in StableDiffusionXLPipeline, ldm-export of its checkpoint, the
pretrained presets on local folders, and the settings that cannot work."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli
from diffusers import DiffusionPipeline, StableDiffusionXLPipeline
from hydra.utils import instantiate
from safetensors.torch import load_file

from train.cli.export import build_module, export_checkpoint
from train.cli.run import run
from train.config.compose import compose
from train.distributed.sharding import load_any_checkpoint
from train.errors import ConfigError

SDXL = ("experiment=sdxl_tiny", "logger=none")
PROMPTS = [
    "a red circle at the top left",
    "a blue square " * 8,  # 112 characters: the byte-level tokenizer cuts it at 77 tokens
    "",
    "Ünïcode ✓",
]
PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def train(root: Path, shards: Path, *overrides: str):
    """`ldm-train experiment=sdxl_tiny` in the test process: (run_dir, cfg, what it printed)."""
    from train.cli.train import main

    args = [f"paths.root={root}", *SDXL, f"data.urls={shards}", *overrides]
    cfg = compose(args)
    proc = run_cli(main, ["ldm-train", *args])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return Path(cfg.paths.run_dir), cfg, proc


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(next(folder.glob("*.safetensors")))


def tokenizer_file(path: Path) -> dict:
    # A fast tokenizer saves the padding and truncation of its last call in tokenizer.json; the
    # pipelines pass both on every call, so only the vocabulary and the rest must agree.
    return {k: v for k, v in json.loads(path.read_text()).items()
            if k not in ("padding", "truncation")}  # fmt: skip


@pytest.fixture(scope="module")
def sdxl_run(tmp_path_factory, demo_shards):
    return train(tmp_path_factory.mktemp("sdxl_run"), demo_shards)


def test_conditioner_equals_the_pipelines_encode_prompt(compose):
    cfg = compose(*SDXL)
    module = build_module(cfg.model, cfg.seed)
    conditioner = module.conditioner
    sizes = (conditioner.hidden_size, conditioner.pooled_size, conditioner.max_length)
    assert sizes == (80, 16, 77)  # 32 + 48 wide, projection 16, CLIP's 77 tokens
    assert set(conditioner.pipeline_parts()) == {"text_encoder", "text_encoder_2", "tokenizer",
                                                 "tokenizer_2"}  # fmt: skip
    pipe = module.pipeline()
    assert isinstance(pipe, StableDiffusionXLPipeline)
    hidden, neg_hidden, pooled, neg_pooled = pipe.encode_prompt(
        PROMPTS, device=torch.device("cpu"), do_classifier_free_guidance=True
    )
    cond = conditioner.encode({"caption": PROMPTS}, None)
    assert cond.hidden.shape == (4, 77, 80) and cond.pooled.shape == (4, 16)
    torch.testing.assert_close(cond.hidden, hidden, rtol=0, atol=1e-6)
    torch.testing.assert_close(cond.pooled, pooled, rtol=0, atol=1e-6)
    assert (hidden[0] - hidden[1]).abs().max() > 1e-3, "different prompts, different states"
    # The unconditional branch the pipeline guides with is the null that caption dropout uses.
    null = conditioner.null()
    torch.testing.assert_close(neg_hidden, null.hidden.expand_as(hidden), rtol=0, atol=1e-6)
    torch.testing.assert_close(neg_pooled, null.pooled.expand_as(pooled), rtol=0, atol=1e-6)
    torch.testing.assert_close(hidden[2], null.hidden[0], rtol=0, atol=1e-6)
    dropped = conditioner.encode({"caption": PROMPTS}, torch.tensor([True, False, False, True]))
    assert torch.equal(dropped.hidden[0], null.hidden[0])
    assert torch.equal(dropped.hidden[1], cond.hidden[1])
    assert torch.equal(dropped.pooled[3], null.pooled[0])
    assert torch.equal(dropped.pooled[1], cond.pooled[1])


def test_tiny_run_trains_and_its_export_generates(sdxl_run):
    run_dir, cfg, proc = sdxl_run
    loss = re.search(r"Final train/loss: (\S+)", proc.stdout)
    assert loss and math.isfinite(float(loss.group(1))), proc.stdout
    export = run_dir / "export"
    initial = build_module(cfg.model, cfg.seed)  # the run's start: the same seeded init
    trained = weights(export / "unet")
    start = initial.trainable.state_dict()
    assert trained.keys() == start.keys()
    assert all(v.isfinite().all() for v in trained.values())
    assert any(not torch.equal(v, start[k]) for k, v in trained.items()), "nothing trained"

    pipe = DiffusionPipeline.from_pretrained(export, local_files_only=True)
    assert isinstance(pipe, StableDiffusionXLPipeline)
    assert pipe.config.force_zeros_for_empty_prompt is False
    # The shipped encoders and tokenizers give what the run's conditioner gave.
    hidden, _, pooled, _ = pipe.encode_prompt(PROMPTS, device=torch.device("cpu"),
                                              do_classifier_free_guidance=False)  # fmt: skip
    cond = initial.conditioner.encode({"caption": PROMPTS}, None)
    torch.testing.assert_close(hidden, cond.hidden, rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled, cond.pooled, rtol=0, atol=1e-6)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(PROMPTS[:2], num_inference_steps=2, guidance_scale=5.0, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    size = cfg.data.resolution
    assert size == 16 and images.shape == (2, size, size, 3)
    assert images.min() >= 0.0 and images.max() <= 1.0 and images.std() > 0


def test_ldm_export_of_last_ckpt_equals_the_runs_export(sdxl_run, tmp_path):
    run_dir, _, _ = sdxl_run
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    again = export_checkpoint(ckpt, tmp_path / "again")
    export = run_dir / "export"
    files = sorted(p.relative_to(export) for p in export.rglob("*.safetensors"))
    assert {f.parts[0] for f in files} == set(PARTS)
    assert sorted(p.relative_to(again) for p in again.rglob("*.safetensors")) == files
    for f in files:
        a, b = load_file(export / f), load_file(again / f)
        assert a.keys() == b.keys(), f
        assert all(torch.equal(a[k], b[k]) for k in a), f
    for name in ("tokenizer", "tokenizer_2"):
        for f in (export / name).iterdir():
            assert tokenizer_file(f) == tokenizer_file(again / name / f.name), f
    index = json.loads((again / "model_index.json").read_text())
    assert index == json.loads((export / "model_index.json").read_text())
    state = load_any_checkpoint(ckpt)["state_dict"]
    backbone = {k.removeprefix("backbone.model."): v for k, v in state.items()
                if k.startswith("backbone.model.")}  # fmt: skip
    assert len(backbone) == len(state), "frozen parts stay out of the checkpoint"
    unet = weights(export / "unet")
    assert backbone.keys() == unet.keys()
    assert all(torch.equal(v, unet[k]) for k, v in backbone.items())


def test_pretrained_presets_train_from_local_folders(compose, demo_shards, tmp_path):
    """model/conditioner=sdxl and model/backbone=unet_sdxl, pointed at save_pretrained folders
    of the tiny parts in the layout of the SDXL base repository."""
    cfg = compose(*SDXL)
    torch.manual_seed(0)
    parts = tmp_path / "sdxl-base"
    unet = instantiate(cfg.model.backbone.model)
    unet.save_pretrained(parts / "unet")
    c = cfg.model.conditioner
    for name, node in (("text_encoder", c.text_encoder_1), ("text_encoder_2", c.text_encoder_2),
                       ("tokenizer", c.tokenizer_1), ("tokenizer_2", c.tokenizer_2)):  # fmt: skip
        instantiate(node).save_pretrained(parts / name)
    run_dir, _, _ = train(
        tmp_path / "out", demo_shards, "model/conditioner=sdxl", "model/backbone=unet_sdxl",
        f"model.conditioner.text_encoder_1.pretrained_model_name_or_path={parts}",
        f"model.backbone.model.pretrained_model_name_or_path={parts}",
    )  # fmt: skip
    export = run_dir / "export"
    start, trained = weights(parts / "unet"), weights(export / "unet")
    assert any(not torch.equal(v, start[k]) for k, v in trained.items()), "nothing trained"
    for name in ("text_encoder", "text_encoder_2"):  # frozen: shipped as loaded
        a, b = weights(parts / name), weights(export / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # The checkpoint names the folders, not the weights; ldm-export reads them from there.
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    frozen = load_any_checkpoint(ckpt)["ldm_parts"]["frozen"]
    for name in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        assert (frozen[name]["pretrained"], frozen[name]["subfolder"]) == (str(parts), name)
        assert "state" not in frozen[name]
    again = export_checkpoint(ckpt, tmp_path / "again")
    for name in ("unet", "text_encoder_2"):
        a, b = weights(export / name), weights(again / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.backbone.model.projection_class_embeddings_input_dim=70"],
         r"projection_class_embeddings_input_dim=70 .* set it to 64"),
        (["model/conditioner=minilm", "model.backbone.model.cross_attention_dim=384"],
         r"addition_embed_type=text_time \(SDXL\) needs a pooled text embedding"),
        (["model.conditioner.text_encoder_2._target_=transformers.CLIPTextModel"],
         r"model\.conditioner\.text_encoder_2 is a CLIPTextModel"),
        (["model.conditioner.text_encoder_1.config.vocab_size=500"],
         r"set model\.conditioner\.text_encoder_1\.config\.vocab_size=514"),
    ],
    ids=["projection-dim", "no-pooled", "no-projection", "vocab"],
)  # fmt: skip
def test_parts_that_cannot_work_fail_before_training(compose, demo_shards, overrides, message):
    cfg = compose(*SDXL, f"data.urls={demo_shards}", *overrides)
    # ConfigError itself (not Hydra's wrapper): ldm-train answers it in one line.
    with pytest.raises(ConfigError, match=message):
        run(cfg)
    run_dir = Path(cfg.paths.run_dir)
    assert not (run_dir / "checkpoints").exists() and not (run_dir / ".hydra").exists()
