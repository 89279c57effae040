"""Tokenizers for the tiny configs, built offline: a character-level CLIP BPE tokenizer and a
word-level T5 (Unigram) tokenizer, written once into a cache folder that `from_pretrained`
reads (`${tiny_clip_tokenizer:}`, `${tiny_t5_tokenizer:}` in conf/).

The real ones (openai/clip-vit-large-patch14, google/t5-v1_1-xxl) come from the hub or a local
folder; no registry package ships their files. These are the same tokenizer classes with small
vocabularies, so the tiny SDXL / SD3 / Flux configs run the pipelines' own code paths.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

VERSION = 1  # bump when the vocabularies change: the cache folder is keyed by it
CLIP_VOCAB_SIZE = 514  # 256 byte symbols, the same with </w>, two specials; no merges
# fmt: off
WORDS = [
    "a", "an", "the", "of", "and", "with", "in", "on", "at", "photo", "picture", "image", "red",
    "green", "blue", "yellow", "cyan", "magenta", "black", "white", "orange", "purple", "pink",
    "brown", "gray", "grey", "circle", "square", "triangle", "star", "big", "small", "left",
    "right", "top", "bottom", "center", "middle", "background",
]
# fmt: on


def _cache(name: str) -> Path:
    root = os.environ.get("LDM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ldm-pipeline"
    )
    return Path(root) / f"{name}-v{VERSION}"


def _bytes_to_unicode() -> list[str]:
    """GPT-2 / CLIP's reversible byte -> printable character map (Radford et al. 2019)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]  # fmt: skip
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs, strict=True))]


def _write_atomically(folder: Path, save) -> str:
    if (folder / "tokenizer_config.json").is_file():
        return str(folder)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    save(tmp)
    try:
        tmp.rename(folder)
    except OSError:  # another process wrote it first: same content
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)


def tiny_clip_tokenizer() -> str:
    """Folder of a CLIPTokenizer over bytes (every word splits into characters)."""

    def save(tmp: Path) -> None:
        from transformers import CLIPTokenizer

        symbols = _bytes_to_unicode()
        vocab = [*symbols, *(s + "</w>" for s in symbols), "<|startoftext|>", "<|endoftext|>"]
        (tmp / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}))
        (tmp / "merges.txt").write_text("#version: 0.2\n")
        tok = CLIPTokenizer(str(tmp / "vocab.json"), str(tmp / "merges.txt"), model_max_length=77)
        tok.save_pretrained(tmp)

    return _write_atomically(_cache("tiny-clip-tokenizer"), save)


def tiny_t5_tokenizer() -> str:
    """Folder of a T5Tokenizer (Unigram) over a few words and single characters."""

    def save(tmp: Path) -> None:
        from transformers import T5Tokenizer

        chars = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"
        pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
        pieces += [("▁" + w, -5.0) for w in WORDS]
        pieces += [("▁" + c, -8.0) for c in chars] + [(c, -9.0) for c in chars]
        pieces += [(f"<extra_id_{i}>", 0.0) for i in range(99, -1, -1)]
        T5Tokenizer(vocab=pieces, extra_ids=100, model_max_length=32).save_pretrained(tmp)

    return _write_atomically(_cache("tiny-t5-tokenizer"), save)
