"""Prompts from a file, for sample previews: `callbacks.samples.prompts=${prompt_file:PATH}`."""

from __future__ import annotations

from pathlib import Path


def prompt_file(path: str) -> list[str]:
    """The non-blank lines of a UTF-8 text file, stripped; lines starting with `#` are comments.

    An empty or missing file is an error, not an empty list: SamplePreview would silently fall
    back to the batch's captions, and the run would show previews of prompts nobody chose."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"prompt file {file} does not exist (callbacks.samples.prompts)")
    lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines()]
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise ValueError(f"prompt file {file} holds no prompts (callbacks.samples.prompts)")
    return prompts
