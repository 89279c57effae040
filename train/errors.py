"""How every console script answers bad input: one line on stderr naming the file or setting and
the fix, exit code 2, no traceback.

A user who typed a wrong path or value needs the setting and the fix; a stack trace buries it.
Whoever debugs the tool itself asks for the trace: `--debug` (the argparse scripts, through
`ArgumentParser` here) or `HYDRA_FULL_ERROR=1` (any script, as Hydra's own switch). Nothing here
imports torch or Hydra: the scripts use it before their heavy imports, so that bad input fails in
about a second.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback
from collections.abc import Iterator
from typing import Any, NoReturn

EXIT_BAD_INPUT = 2


class ConfigError(ValueError):
    """A setting that cannot work; the message names the key and what to do."""


# What counts as bad input: our own ConfigError, and a path that is not there or not usable.
BAD_INPUT: tuple[type[BaseException], ...] = (
    ConfigError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
)


def cause_of(exc: BaseException, kinds: tuple[type[BaseException], ...]) -> BaseException | None:
    """The first exception of ``kinds`` in ``exc``'s chain of causes (e.g. a part's own check
    that Hydra's InstantiationException wraps), or None."""
    cause = exc.__cause__
    while cause is not None and not isinstance(cause, kinds):
        cause = cause.__cause__
    return cause


def debugging(flag: bool = False) -> bool:
    """True when tracebacks were asked for: `--debug` or Hydra's HYDRA_FULL_ERROR=1."""
    return flag or os.environ.get("HYDRA_FULL_ERROR") == "1"


def one_line(message: str) -> str:
    """Library messages (Hydra's, OmegaConf's) span several lines: the first paragraph, joined,
    without Hydra's hint on tracebacks (we print our own rule). Hydra's list of the options of
    a config group (`experiment=nope`) is kept: it is the fix."""
    paragraphs = [p.strip().splitlines() for p in message.strip().split("\n\n") if p.strip()]
    if not paragraphs:
        return message.strip()
    lines = [line.strip() for line in paragraphs[0]
             if not line.startswith("Set the environment variable HYDRA_FULL_ERROR")]  # fmt: skip
    if len(paragraphs) > 1 and paragraphs[1][0].startswith("Available options"):
        options = []
        for line in paragraphs[1][1:]:
            if not line.startswith("\t"):
                break
            options.append(line.strip())
        lines.append(f"{paragraphs[1][0].strip()} {', '.join(options)}")
    return "; ".join(lines) or message.strip()


def report(prefix: str, message: str, debug: bool = False) -> int:
    """Print `prefix message` as one line (after the traceback when debugging); returns 2, the
    exit code, for entry points that return theirs."""
    if debugging(debug) and sys.exc_info()[0] is not None:
        traceback.print_exc()
    print(f"{prefix} {one_line(message)}".strip(), file=sys.stderr, flush=True)
    return EXIT_BAD_INPUT


def fail(prefix: str, message: str, debug: bool = False) -> NoReturn:
    """`report`, then exit 2."""
    raise SystemExit(report(prefix, message, debug))


@contextlib.contextmanager
def bad_input(
    prefix: str, debug: bool = False, kinds: tuple[type[BaseException], ...] = BAD_INPUT
) -> Iterator[None]:
    """Turn the `kinds` of exception raised in the block into `fail(prefix, message)`."""
    try:
        yield
    except kinds as e:
        fail(prefix, str(e), debug)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the rule above: a usage error is one line (and points at --help), and
    every parser (subcommands too) takes `--debug`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # SUPPRESS: a subcommand's parser must not reset a --debug given before the subcommand.
        self.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                          help="show the traceback of an error")  # fmt: skip

    def error(self, message: str) -> NoReturn:
        fail(f"{self.prog}: error:", f"{message} (see {self.prog} --help)")


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1 (steps, sample counts, batch sizes)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def debug_flag(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "debug", False))
