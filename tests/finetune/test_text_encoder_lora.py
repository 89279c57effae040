"""A LoRA on the text encoder beside the UNet's (`model/conditioner/adapter=lora`) over a base
whose text encoder is a tiny CLIP: both adapters train, the checkpoint holds both and nothing of
the base, and every export gives the output of the encoder's EMA (the run keeps one):
diffusers' `load_lora_weights` on `lora/` and on the kohya file (`lora_te_*` keys, the names
ComfyUI maps), and the merged export's `text_encoder/`; a resumed run ends with the same EMA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cli_runner import run_cli
from diffusers import StableDiffusionPipeline
from finetune_runs import finetune_overrides, resumed_from_step_2
from hydra.utils import instantiate
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from train.callbacks.ema import text_ema_from_checkpoint
from train.cli.export import load_text_ema, module_from_checkpoint
from train.config.compose import compose
from train.config.fit import check_adapter_strategy
from train.errors import ConfigError
from train.models.conditioners.tiny_tokenizers import tiny_clip_tokenizer
from train.tracking.lineage import finetune_tags

PROMPTS = ["a red circle at the top left on a white background", "a blue square"]
TEXT_LORA = ("model/conditioner/adapter=lora", "model.conditioner.adapter.r=4",
             "model.conditioner.adapter.lora_alpha=8")  # fmt: skip
# An EMA far from the live weights after 4 steps: the exports must carry the encoder's EMA.
EMA = ("callbacks/ema=default", "callbacks.ema.decay=0.5")


@pytest.fixture(scope="module")
def clip_base(tiny_run, tmp_path_factory) -> Path:
    """The session's tiny export with a random tiny CLIP text encoder (the UNet's width) and
    the offline CLIP tokenizer in place of MiniLM."""
    pipe = StableDiffusionPipeline.from_pretrained(tiny_run[0] / "export", safety_checker=None)
    width = pipe.unet.config.cross_attention_dim
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=514, hidden_size=width, intermediate_size=2 * width,
                            num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=77, bos_token_id=512, eos_token_id=513,
                            pad_token_id=513)  # fmt: skip
    tokenizer = CLIPTokenizer.from_pretrained(tiny_clip_tokenizer())
    pipe.register_modules(text_encoder=CLIPTextModel(config).eval(), tokenizer=tokenizer)
    out = tmp_path_factory.mktemp("clip-base")
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def run_args(root: Path, base: Path, shards: Path, *extra: str) -> list[str]:
    return finetune_overrides("lora", root, base, shards, *TEXT_LORA, *EMA, *extra)


@pytest.fixture(scope="module")
def text_lora_run(clip_base, demo_shards, tmp_path_factory) -> Path:
    from train.cli.train import main

    root = tmp_path_factory.mktemp("text-lora")
    args = run_args(root, clip_base, demo_shards)
    proc = run_cli(main, ["ldm-train", *args])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return Path(compose(args).paths.run_dir)


def encoded(encoder: CLIPTextModel, base: Path) -> torch.Tensor:
    """The encoder's hidden states for PROMPTS, tokenized as the pipeline does."""
    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    ids = tokenizer(PROMPTS, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids  # fmt: skip
    with torch.no_grad():
        return encoder.eval()(ids)[0]


def test_both_adapters_train_and_the_checkpoint_holds_only_them(text_lora_run) -> None:
    state = torch.load(text_lora_run / "checkpoints/last.ckpt", weights_only=False)["state_dict"]
    text = {k: v for k, v in state.items() if k.startswith("trained_conditioner.")}
    assert text and any(k.startswith("backbone.") for k in state)
    assert all("lora_" in k for k in state)  # no frozen weight of the UNet or the encoder
    assert {k.rsplit(".", 3)[-3] for k in text} == {"lora_A", "lora_B"}
    # peft starts B at zero: trained, it moved.
    assert all(v.abs().max() > 0 for k, v in text.items() if "lora_B" in k)


def test_every_export_gives_the_text_encoders_ema(text_lora_run, clip_base) -> None:
    ckpt = text_lora_run / "checkpoints/last.ckpt"
    module, _ = module_from_checkpoint(ckpt)
    live = encoded(module.conditioner.model, clip_base)
    load_text_ema(module, torch.load(ckpt, weights_only=False))
    trained = encoded(module.conditioner.model, clip_base)
    assert (trained - live).abs().max() > 1e-3  # the EMA is not the last step's adapter
    pipe = StableDiffusionPipeline.from_pretrained(clip_base, safety_checker=None)
    assert (encoded(pipe.text_encoder, clip_base) - trained).abs().max() > 1e-3
    for folder in ("lora", "lora_kohya"):  # diffusers' format, then its kohya converter
        pipe.load_lora_weights(text_lora_run / folder)
        torch.testing.assert_close(encoded(pipe.text_encoder, clip_base), trained, rtol=0,
                                   atol=1e-5)  # fmt: skip
        pipe.unload_lora_weights()
    merged = CLIPTextModel.from_pretrained(text_lora_run / "export", subfolder="text_encoder")
    assert not any("lora" in k for k in merged.state_dict())
    torch.testing.assert_close(encoded(merged, clip_base), trained, rtol=0, atol=1e-5)


def test_ldm_export_of_the_checkpoint_writes_both_adapters(text_lora_run, tmp_path) -> None:
    from train.cli.export import main as ldm_export

    ckpt = text_lora_run / "checkpoints" / "last.ckpt"
    for fmt, same_as, text_key in (("diffusers-lora", "lora", "text_encoder."),
                                   ("kohya", "lora_kohya", "lora_te_"),
                                   ("merged", "export/text_encoder", "encoder.")):  # fmt: skip
        proc = run_cli(ldm_export, ["ldm-export", str(ckpt), str(tmp_path / fmt), "--format", fmt])
        assert proc.returncode == 0, proc.stdout + proc.stderr
        sub = "text_encoder" if fmt == "merged" else ""
        got = load_file(next((tmp_path / fmt / sub).glob("*.safetensors")))
        want = load_file(next((text_lora_run / same_as).glob("*.safetensors")))
        assert got.keys() == want.keys() and any(k.startswith(text_key) for k in got)
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_the_kohya_file_has_the_names_comfyui_maps_onto_clip(text_lora_run) -> None:
    """ComfyUI's `model_lora_keys_clip` (comfy/lora.py) maps SD 1.x's `lora_te_text_model_
    encoder_layers_<b>_<c>` for c in CLIP's attention and MLP projections; alpha is trained."""
    state = load_file(text_lora_run / "lora_kohya" / "lora.safetensors")
    layers = {"self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj",
              "mlp_fc1", "mlp_fc2"}  # fmt: skip
    comfy = {f"lora_te_text_model_encoder_layers_{b}_{c}" for b in range(2) for c in layers}
    names = {k.split(".")[0] for k in state if k.startswith("lora_te_")}
    assert len(names) == 8 and names <= comfy, names - comfy  # 2 layers x q, k, v, out
    assert all(state[f"{n}.alpha"].item() == 8 for n in names)
    assert any(k.startswith("lora_unet_") for k in state)


def test_resume_from_step_2_ends_with_the_same_adapters(text_lora_run, clip_base, demo_shards,
                                                        tmp_path) -> None:  # fmt: skip
    ref, got = resumed_from_step_2(text_lora_run, tmp_path, lambda step2: run_args(
        tmp_path, clip_base, demo_shards, f"ckpt_path={step2}"))  # fmt: skip
    want, have = (text_ema_from_checkpoint(c) for c in (ref, got))
    assert want and want.keys() == have.keys()  # the encoder's EMA resumed too
    assert all(torch.equal(want[k], have[k]) for k in want)


def test_mlflow_lineage_names_the_text_encoder_adapter(clip_base, demo_shards, tmp_path):
    module = instantiate(compose(run_args(tmp_path, clip_base, demo_shards)).model)
    tags = finetune_tags(module)
    assert tags["text_encoder_adapter.type"] == "LoraConfig"
    assert (tags["text_encoder_adapter.rank"], tags["text_encoder_adapter.alpha"]) == ("4", "8")
    assert tags["adapter.target_modules"] != tags["text_encoder_adapter.target_modules"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("model.conditioner.adapter.target_modules=[to_q]",),
         r"model.conditioner.adapter.target_modules=\['to_q'\] matches no module of the "
         r"CLIPTextModel; its adaptable layers end in: .*q_proj"),
        (("+model.conditioner.cache_size=64",),
         "model.conditioner.cache_size=64 caches the encoder's outputs"),
        (("model.backbone.adapter=null",), "but model.backbone.adapter is null"),
    ],
)  # fmt: skip
def test_a_text_adapter_that_cannot_train_is_refused_naming_the_setting(
    extra, message, clip_base, demo_shards, tmp_path
) -> None:
    cfg = compose(run_args(tmp_path, clip_base, demo_shards, *extra))
    with pytest.raises(ConfigError, match=message):
        try:
            instantiate(cfg.model)
        except Exception as e:  # Hydra wraps what a constructor raises
            raise e.__cause__ or e from None


@pytest.mark.parametrize("strategy", ["deepspeed_zero3", "fsdp", "fsdp2"])
def test_a_sharding_strategy_is_refused_before_training(strategy, clip_base, demo_shards,
                                                        tmp_path) -> None:  # fmt: skip
    cfg = compose(run_args(tmp_path, clip_base, demo_shards, f"strategy={strategy}"))
    with pytest.raises(ConfigError, match="model.conditioner.adapter trains the text encoder, "
                       "which .* would shard; train it under strategy=ddp"):  # fmt: skip
        check_adapter_strategy(cfg)


def test_encoded_shards_are_refused(clip_base, demo_shards, tmp_path) -> None:
    """Precomputed hidden states (ldm-data encode) cannot train the encoder that made them."""
    conditioner = instantiate(compose(run_args(tmp_path, clip_base, demo_shards)).model.conditioner)
    batch = {"encoder_hidden_states": torch.zeros(2, 77, conditioner.hidden_size)}
    with pytest.raises(ConfigError, match="model.conditioner.adapter trains the text encoder, "
                       "but the shards hold its outputs"):  # fmt: skip
        conditioner.encode(batch, None)
