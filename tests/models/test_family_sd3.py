"""The SD3 family on CPU: the three-encoder conditioner (and its CLIP-only form) against the
pipeline's encode_prompt, the backbone against one step of the pipeline's sampler, a tiny run and
its export in StableDiffusion3Pipeline, ldm-export of its checkpoint, the pretrained presets on
local folders, and the settings that cannot work."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli
from diffusers import DiffusionPipeline, StableDiffusion3Pipeline
from hydra.errors import InstantiationException
from safetensors.torch import load_file
from transformers import AutoTokenizer

from train.cli.export import build_module, export_checkpoint
from train.cli.run import run
from train.cli.sample import generate, load_pipeline
from train.config.compose import compose
from train.distributed.sharding import load_any_checkpoint
from train.errors import ConfigError
from train.tasks.parts_spec import describe, rebuild_pipeline

SD3 = ("experiment=sd3_tiny", "logger=none")
CLIP_ONLY = ("model.conditioner.text_encoder_3=null", "model.conditioner.tokenizer_3=null",
             "model.conditioner.joint_attention_dim=64")  # fmt: skip
PROMPTS = ["a red circle at the top left", "a blue square " * 8, "", "Ünïcode ✓"]
MODELS = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
TOKENIZERS = ("tokenizer", "tokenizer_2", "tokenizer_3")
T5_LENGTH = 32  # model.conditioner.max_sequence_length of sd3_tiny


def train(root: Path, shards: Path, *overrides: str):
    """`ldm-train experiment=sd3_tiny` in the test process: (run_dir, cfg, what it printed)."""
    from train.cli.train import main

    args = [f"paths.root={root}", *SD3, f"data.urls={shards}", *overrides]
    cfg = compose(args)
    proc = run_cli(main, ["ldm-train", *args])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return Path(cfg.paths.run_dir), cfg, proc


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(next(folder.glob("*.safetensors")))


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), what
    assert all(torch.equal(a[k], b[k]) for k in a), what


def assert_same_tokenizer(a: Path, b: Path) -> None:
    """Same settings and ids (tokenizer.json also holds the last call's padding state)."""
    config = "tokenizer_config.json"
    assert json.loads((a / config).read_text()) == json.loads((b / config).read_text()), a.name
    ta, tb = AutoTokenizer.from_pretrained(a), AutoTokenizer.from_pretrained(b)
    assert type(ta) is type(tb) and ta(PROMPTS).input_ids == tb(PROMPTS).input_ids, a.name


@pytest.fixture(scope="module")
def sd3_run(tmp_path_factory, demo_shards):
    return train(tmp_path_factory.mktemp("sd3_run"), demo_shards)


@pytest.mark.parametrize("clip_only", [False, True], ids=["t5", "clip-only"])
def test_conditioner_equals_the_pipelines_encode_prompt(compose, clip_only):
    cfg = compose(*SD3, *(CLIP_ONLY if clip_only else ()))
    module = build_module(cfg.model, cfg.seed)
    conditioner = module.conditioner
    sizes = (conditioner.hidden_size, conditioner.pooled_size, conditioner.max_length)
    assert sizes == (64, 64, 77)
    assert set(conditioner.pipeline_parts()) == {*TOKENIZERS, *MODELS[2:]}
    pipe = module.pipeline()
    assert isinstance(pipe, StableDiffusion3Pipeline)
    assert (pipe.text_encoder_3 is None) == clip_only
    hidden, neg_hidden, pooled, neg_pooled = pipe.encode_prompt(
        PROMPTS, None, None, device=torch.device("cpu"), do_classifier_free_guidance=True,
        max_sequence_length=T5_LENGTH,
    )  # fmt: skip
    cond = conditioner.encode({"caption": PROMPTS}, None)
    assert cond.hidden.shape == (4, 77 + T5_LENGTH, 64) and cond.pooled.shape == (4, 64)
    torch.testing.assert_close(cond.hidden, hidden, rtol=0, atol=1e-6)
    torch.testing.assert_close(cond.pooled, pooled, rtol=0, atol=1e-6)
    t5_part = cond.hidden[:, 77:]
    assert (t5_part.abs().max() == 0) == clip_only, "zeros stand in for T5 only without it"
    assert (hidden[0] - hidden[1]).abs().max() > 1e-3, "different prompts, different states"
    # The unconditional branch the pipeline guides with is the null that caption dropout uses.
    null = conditioner.null()
    torch.testing.assert_close(neg_hidden, null.hidden.expand_as(hidden), rtol=0, atol=1e-6)
    torch.testing.assert_close(neg_pooled, null.pooled.expand_as(pooled), rtol=0, atol=1e-6)
    dropped = conditioner.encode({"caption": PROMPTS}, torch.tensor([True, False, False, True]))
    assert torch.equal(dropped.hidden[0], null.hidden[0])
    assert torch.equal(dropped.pooled[3], null.pooled[0])
    assert torch.equal(dropped.hidden[1], cond.hidden[1])


def test_backbone_prediction_is_the_velocity_the_pipeline_steps_with(compose):
    """One Euler step of the pipeline from sigma 1 to 0 moves the latents by -v: the v it used
    is the backbone's prediction at t = 1000 for the conditioner's embeddings."""
    cfg = compose(*SD3)
    module = build_module(cfg.model, cfg.seed).eval()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    pipe = module.pipeline()
    with torch.no_grad():
        out = pipe(PROMPTS[:2], num_inference_steps=1, guidance_scale=1.0, latents=x.clone(),
                   output_type="latent",
                   **module.conditioner.pipeline_call_kwargs()).images  # fmt: skip
        cond = module.conditioner.encode({"caption": PROMPTS[:2]}, None)
        v = module.backbone(x, torch.full((2,), 1000.0), cond)
    torch.testing.assert_close(x - out, v, rtol=1e-5, atol=1e-5)
    assert v.abs().max() > 1e-3


def test_tiny_run_trains_and_its_export_generates(sd3_run):
    run_dir, cfg, proc = sd3_run
    loss = re.search(r"Final train/loss: (\S+)", proc.stdout)
    assert loss and math.isfinite(float(loss.group(1))), proc.stdout
    export = run_dir / "export"
    initial = build_module(cfg.model, cfg.seed)  # the run's start: the same seeded init
    trained, start = weights(export / "transformer"), initial.trainable.state_dict()
    assert trained.keys() == start.keys()
    assert all(v.isfinite().all() for v in trained.values())
    assert any(not torch.equal(v, start[k]) for k, v in trained.items()), "nothing trained"

    pipe = DiffusionPipeline.from_pretrained(export, local_files_only=True)
    assert isinstance(pipe, StableDiffusion3Pipeline)
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert pipe.tokenizer_3.model_max_length == T5_LENGTH  # what ldm-sample passes
    hidden, _, pooled, _ = pipe.encode_prompt(
        PROMPTS, None, None, do_classifier_free_guidance=False, max_sequence_length=T5_LENGTH
    )
    cond = initial.conditioner.encode({"caption": PROMPTS}, None)
    # Reloaded weights are equal; the reloaded models' kernels differ in the last bits.
    torch.testing.assert_close(hidden, cond.hidden, rtol=0, atol=1e-5)
    torch.testing.assert_close(pooled, cond.pooled, rtol=0, atol=1e-5)
    # ldm-sample's loader and call: the export's own flow sampler, the trained T5 length.
    images = generate(load_pipeline(export), PROMPTS[:2], steps=2, guidance_scale=5.0)
    size = cfg.data.resolution
    assert size == 16 and [im.size for im in images] == [(size, size)] * 2
    assert max(im.getextrema()[0][1] for im in images) > 0


def test_ldm_export_of_last_ckpt_equals_the_runs_export(sd3_run, tmp_path):
    run_dir, _, _ = sd3_run
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    again = export_checkpoint(ckpt, tmp_path / "again")
    export = run_dir / "export"
    files = sorted(p.relative_to(export) for p in export.rglob("*.safetensors"))
    assert {f.parts[0] for f in files} == set(MODELS)
    assert sorted(p.relative_to(again) for p in again.rglob("*.safetensors")) == files
    for f in files:
        assert_same(load_file(export / f), load_file(again / f), str(f))
    for name in TOKENIZERS:
        assert_same_tokenizer(export / name, again / name)
    assert json.loads((again / "model_index.json").read_text()) == json.loads(
        (export / "model_index.json").read_text()
    )
    state = load_any_checkpoint(ckpt)["state_dict"]
    backbone = {k.removeprefix("backbone.model."): v for k, v in state.items()
                if k.startswith("backbone.model.")}  # fmt: skip
    assert len(backbone) == len(state), "frozen parts stay out of the checkpoint"
    assert_same(backbone, weights(export / "transformer"), "transformer")


def test_clip_only_export_loads_with_the_absent_t5(compose, tmp_path):
    """Without T5 the pipeline saves text_encoder_3 as [null, null], which from_pretrained
    refuses unless told; ldm-sample's loader tells it, and the parts spec rebuilds it."""
    cfg = compose(*SD3, *CLIP_ONLY)
    module = build_module(cfg.model, cfg.seed)
    spec = describe(module)
    assert spec["frozen"]["text_encoder_3"] is None and spec["frozen"]["tokenizer_3"] is None
    state = module.trainable.state_dict()
    rebuilt = rebuild_pipeline(spec, state)
    assert rebuilt.text_encoder_3 is None
    rebuilt.save_pretrained(tmp_path / "export", safe_serialization=True)
    index = json.loads((tmp_path / "export" / "model_index.json").read_text())
    assert index["text_encoder_3"] == [None, None]
    with pytest.raises(ValueError, match="text_encoder_3"):
        DiffusionPipeline.from_pretrained(tmp_path / "export")
    pipe = load_pipeline(tmp_path / "export")
    assert pipe.text_encoder_3 is None
    assert_same(pipe.transformer.state_dict(), state, "transformer")
    images = generate(pipe, PROMPTS[:1], steps=2, guidance_scale=5.0)
    assert images[0].size == (16, 16)


def test_pretrained_presets_train_from_local_folders(compose, demo_shards, tmp_path):
    """model/backbone=sd3, model/conditioner=sd3 and model/vae=pretrained pointed at a
    save_pretrained folder of the tiny parts, laid out as the SD3 Medium repository."""
    cfg = compose(*SD3)
    parts = build_module(cfg.model, cfg.seed).export(tmp_path / "sd3-medium")
    run_dir, _, _ = train(
        tmp_path / "out", demo_shards, "model/backbone=sd3", "model/conditioner=sd3",
        "model/vae=pretrained", f"model.vae.pretrained_model_name_or_path={parts}",
        "model.vae.subfolder=vae", f"model.backbone.model.pretrained_model_name_or_path={parts}",
        f"model.conditioner.text_encoder.pretrained_model_name_or_path={parts}",
        f"model.conditioner.max_sequence_length={T5_LENGTH}", "trainer.max_steps=2",
        "callbacks.checkpoint.every_n_train_steps=1",
    )  # fmt: skip
    export = run_dir / "export"
    start, trained = weights(parts / "transformer"), weights(export / "transformer")
    assert any(not torch.equal(v, start[k]) for k, v in trained.items()), "nothing trained"
    for name in MODELS[1:]:  # frozen: shipped as loaded
        assert_same(weights(parts / name), weights(export / name), name)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    frozen = load_any_checkpoint(ckpt)["ldm_parts"]["frozen"]
    for name in (*MODELS[1:], *TOKENIZERS):  # the folders, not the weights
        assert (frozen[name]["pretrained"], frozen[name]["subfolder"]) == (str(parts), name)
        assert "state" not in frozen[name]
    again = export_checkpoint(ckpt, tmp_path / "again")
    for name in ("transformer", "text_encoder_3"):
        assert_same(weights(export / name), weights(again / name), name)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model/objective=ddpm"],
         r"StableDiffusion3Pipeline samples only with flow schedulers; choose "
         r"model/objective=flow"),
        (["model.backbone.model.joint_attention_dim=48"],
         r"joint_attention_dim=48 but the conditioner's text tokens are 64 wide; set "
         r"model\.backbone\.model\.joint_attention_dim=64"),
        (["model.backbone.model.pooled_projection_dim=32"],
         r"set model\.backbone\.model\.pooled_projection_dim=64"),
        (["model/conditioner=minilm"], r"needs a pooled text embedding"),
        (["model.conditioner.text_encoder._target_=transformers.CLIPTextModel"],
         r"model\.conditioner\.text_encoder is a CLIPTextModel"),
        (["model.conditioner.text_encoder_3.config.d_model=48",
          "model.backbone.model.joint_attention_dim=48"],
         r"CLIP-L \+ CLIP-G hidden sizes \(64\) exceed the joint width 48"),
        (list(CLIP_ONLY[:2]), r"needs model\.conditioner\.joint_attention_dim"),
        (["model.vae.shift_factor=null"], r"set model\.vae\.shift_factor"),
        (["model.conditioner.text_encoder_3.config.vocab_size=100"],
         r"set model\.conditioner\.text_encoder_3\.config\.vocab_size=227"),
    ],
    ids=["ddpm", "joint-dim", "pooled-dim", "no-pooled", "no-projection", "narrow-t5",
         "clip-only-width", "shift-factor", "vocab"],
)  # fmt: skip
def test_parts_that_cannot_work_fail_before_training(compose, demo_shards, overrides, message):
    cfg = compose(*SD3, f"data.urls={demo_shards}", *overrides)
    with pytest.raises((InstantiationException, ConfigError)) as err:
        run(cfg)
    cause = err.value if isinstance(err.value, ConfigError) else err.value.__cause__
    assert isinstance(cause, ConfigError), repr(err.value)
    assert re.search(message, str(cause)), str(cause)
    run_dir = Path(cfg.paths.run_dir)
    assert not (run_dir / "checkpoints").exists() and not (run_dir / ".hydra").exists()
