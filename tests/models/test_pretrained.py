"""The `from_pretrained` configs: UNet and VAE from a local diffusers folder, CLIP from a local
transformers folder, all offline (tiny random models written by the tests)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from hydra.utils import instantiate
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from train.cli.run import run
from train.config.checks import check_config

CLIP_WIDTH = 32
CLIP_MAX_LENGTH = 16
WORDS = ("a", "red", "blue", "circle", "square", "on", "the", "white", "background")


def assert_same_weights(loaded: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    state = loaded.state_dict()
    assert state.keys() == saved.keys()
    for name, value in state.items():
        assert torch.equal(value, saved[name]), name


def test_unet_and_vae_load_from_a_local_folder(compose, tmp_path):
    torch.manual_seed(0)
    tiny = compose("experiment=tiny")
    unet, vae = instantiate(tiny.model.backbone.model), instantiate(tiny.model.vae)
    models = tmp_path / "models"
    unet.save_pretrained(models / "unet")
    vae.save_pretrained(models / "vae")

    cfg = compose(
        "experiment=tiny",
        "model/backbone=unet_pretrained",
        f"model.backbone.model.pretrained_model_name_or_path={models}",
        "model/vae=pretrained",
        f"model.vae.pretrained_model_name_or_path={models}",
        "model.vae.subfolder=vae",
    )
    check_config(cfg)
    assert cfg.model.backbone.model._target_ == "diffusers.UNet2DConditionModel.from_pretrained"
    module = instantiate(cfg.model)
    assert_same_weights(module.trainable, unet.state_dict())
    assert_same_weights(module.vae, vae.state_dict())
    assert module.resolution == 16


def write_clip_tokenizer_files(folder: Path) -> None:
    """A tiny but real CLIP BPE vocabulary: CLIP's 256 byte-level symbols, each also as a word end
    (`</w>`), merges that spell out a few caption words, and the two special tokens."""
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    merges = []
    for word in WORDS:
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            merges.append(f"{parts[0]} {parts[1]}")
            parts = [parts[0] + parts[1], *parts[2:]]
            tokens.append(parts[0])
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    """A folder laid out like a hub CLIP text model: config, safetensors weights, tokenizer."""
    folder = tmp_path_factory.mktemp("clip")
    write_clip_tokenizer_files(folder)
    tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=CLIP_MAX_LENGTH)
    torch.manual_seed(0)
    model = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=CLIP_WIDTH,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=CLIP_MAX_LENGTH,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def test_tiny_clip_tokenizer_is_a_working_bpe(clip_dir):
    tok = CLIPTokenizer.from_pretrained(clip_dir)
    ids = tok("A red  circle on the white background")["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    assert pieces == [
        "<|startoftext|>",
        *(f"{w}</w>" for w in ("a", "red", "circle", "on", "the", "white", "background")),
        "<|endoftext|>",
    ]
    # Words without merges fall back to byte-level symbols instead of <unk>.
    assert tok.convert_ids_to_tokens(tok("xyz")["input_ids"])[1:-1] == ["x", "y", "z</w>"]


def test_clip_text_encoder_trains_exports_and_samples(compose, clip_dir, demo_shards):
    cfg = compose(
        "experiment=tiny",
        f"data.urls={demo_shards}",
        "logger=none",
        "model/conditioner=clip",
        f"model.conditioner.model.pretrained_model_name_or_path={clip_dir}",
        f"model.backbone.model.cross_attention_dim={CLIP_WIDTH}",
        f"model.conditioner.tokenizer.model_max_length={CLIP_MAX_LENGTH}",
        "trainer.max_steps=2",
    )
    assert cfg.model.conditioner.tokenizer.pretrained_model_name_or_path == str(clip_dir)
    run(cfg)

    export = Path(cfg.paths.run_dir) / "export"
    index = json.loads((export / "model_index.json").read_text())
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]

    pipe = StableDiffusionPipeline.from_pretrained(export, use_safetensors=True)
    assert pipe.tokenizer.model_max_length == CLIP_MAX_LENGTH
    assert pipe.text_encoder.config.use_attention_mask is False  # the SD 1.x convention
    # The text encoder is frozen: the export holds exactly the weights it was loaded from.
    assert_same_weights(pipe.text_encoder, CLIPTextModel.from_pretrained(clip_dir).state_dict())
    images = pipe(
        ["a red circle on the white background"],
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    size = cfg.data.resolution
    assert images.shape == (1, size, size, 3)
    assert images.min() >= 0.0 and images.max() <= 1.0 and images.std() > 0
