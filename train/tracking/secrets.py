"""Keep secrets out of what a run records: params, tags, config files and job files.

A secret is the string value of a config key or environment variable whose name says so
(`*_TOKEN`, `*PASSWORD*`, `*SECRET*`, `*_KEY`, `api_key`, `*credential*`). Values of such
environment variables are also scrubbed wherever they appear verbatim (e.g. pulled into the
config with `${oc.env:HF_TOKEN}`), because a run cannot know where a user copied them.
"""

from __future__ import annotations

import os
import re
from typing import Any

# Names ending in token/key, or holding password/secret/credential; not `tokenizer`, `max_tokens`.
SECRET_NAME = re.compile(
    r"((^|[_\-])(token|key)$|passw(or)?d|secret|credential|api_?key)", re.IGNORECASE
)
REDACTED = "***"
MIN_SECRET_LEN = 6  # shorter values would scrub ordinary words


def is_secret_name(name: str) -> bool:
    return bool(SECRET_NAME.search(name.rsplit(".", 1)[-1].rsplit("/", 1)[-1]))


def secret_values(env: dict[str, str] | None = None) -> list[str]:
    """Values of secret-named environment variables, longest first (for replacement)."""
    env = os.environ if env is None else env
    values = {v for k, v in env.items() if is_secret_name(k) and len(v) >= MIN_SECRET_LEN}
    return sorted(values, key=len, reverse=True)


def scrub_text(text: str, values: list[str] | None = None) -> str:
    for value in secret_values() if values is None else values:
        text = text.replace(value, REDACTED)
    return text


def redact(obj: Any, values: list[str] | None = None, key: str = "") -> Any:
    """A copy of a nested dict/list config with secret-named keys' values and known secret
    values replaced by `***`."""
    values = secret_values() if values is None else values
    if isinstance(obj, dict):
        return {k: redact(v, values, str(k)) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [redact(v, values, key) for v in obj]
    if key and is_secret_name(key) and isinstance(obj, str) and obj:
        return REDACTED
    return scrub_text(obj, values) if isinstance(obj, str) else obj


def literal_secret(override: str) -> str | None:
    """The key of a `key=value` override that sets a secret-named key to a literal value (not
    an `${oc.env:...}` reference), else None."""
    key, sep, value = override.partition("=")
    key = key.lstrip("+~")
    if sep and value and is_secret_name(key) and not value.startswith("${"):
        return key
    return None


def redact_overrides(args: list[str]) -> list[str]:
    """Command-line overrides with secret-named keys' values hidden (`key=***`)."""
    out = []
    for arg in args:
        key, sep, _ = arg.partition("=")
        out.append(f"{key}={REDACTED}" if sep and is_secret_name(key.lstrip("+~")) else arg)
    return [scrub_text(a) for a in out]
