"""The prompt set an evaluation generates for: a file, or the captions of validation shards."""

from __future__ import annotations

from pathlib import Path

from train.errors import ConfigError


def read_prompts(path: str | Path, setting: str = "callbacks.eval.prompts") -> list[str]:
    """One prompt per non-blank line; errors name ``setting``, where the path came from."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{setting}={file}: no such file (one prompt per line)")
    prompts = [line.strip() for line in file.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"{setting}={file}: the file holds no prompt")
    return prompts


def val_captions(urls: str, count: int, setting: str = "callbacks.eval.prompts") -> list[str]:
    from data.evalset import iter_eval_samples, set_fingerprint

    captions = [s.caption for s in iter_eval_samples(set_fingerprint(urls)[1], 8, count)]
    if not any(captions):
        raise ConfigError(f"callbacks.eval: the validation shards {urls} hold no captions; "
                          f"give {setting}=FILE")  # fmt: skip
    return captions


def prompt_set(
    prompts: str | Path | None, val_urls: str | None, count: int, setting: str, missing: str
) -> list[str]:
    """``count`` prompts: the file's, else the validation set's captions (cycled); ``missing``
    is the error when neither is given."""
    if prompts:
        listed = read_prompts(prompts, setting)
    elif val_urls:
        listed = val_captions(val_urls, count, setting)
    else:
        raise ConfigError(missing)
    return cycled(listed, count)


def cycled(prompts: list[str], count: int) -> list[str]:
    """``count`` prompts, repeating the list as needed."""
    return [prompts[i % len(prompts)] for i in range(count)]
