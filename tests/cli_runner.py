"""Run a console script's `main` inside the test process, as `subprocess.run` would run it.

A fresh `ldm-train` process spends 8-10 s importing torch, Lightning, diffusers and MLflow before
it does anything; in the test process those imports are paid once. Tests whose subject is what
the command prints, exits with and writes (not the process boundary itself: kills, signals,
several ranks) run it here. Everything the command may change in the process is put back:
argv, the environment (MLflow's `set_tracking_uri` exports MLFLOW_TRACKING_URI, Lightning
exports PL_GLOBAL_SEED), the working directory, the root logger's handlers, Hydra's config
singleton, and the torch thread count (one thread, as the subprocesses run with
OMP_NUM_THREADS=1). Log handlers that libraries attached to the test process's stdout/stderr
at import (Lightning's, transformers', diffusers') write into the captured output during the
call, as they would in a fresh process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path


def run_cli(
    main: Callable[[], object],
    argv: Sequence[str],
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
) -> subprocess.CompletedProcess:
    """`main()` with `sys.argv = argv` and `os.environ = env` (when given); returns the exit
    code and everything written to fds 1 and 2, like `subprocess.run(capture_output=True)`."""
    with _restored_process_state(env, cwd), _captured_fds() as read:
        sys.argv = list(argv)
        code = _exit_code(main)
    stdout, stderr = read()
    return subprocess.CompletedProcess(list(argv), code, stdout, stderr)


def _exit_code(main: Callable[[], object]) -> int:
    try:
        returned = main()
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)  # what the interpreter does with SystemExit("message")
        return 1
    except BaseException:
        traceback.print_exc()
        return 1
    # What a console script does with the value: `sys.exit(main())`.
    return returned if isinstance(returned, int) else 0


@contextlib.contextmanager
def _restored_process_state(env: Mapping[str, str] | None, cwd: str | Path | None) -> Iterator:
    import torch
    from hydra.core.hydra_config import HydraConfig

    saved_env, saved_argv, saved_cwd = dict(os.environ), sys.argv, os.getcwd()
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    saved_threads = torch.get_num_threads()
    # Hydra's app leaves its config in this singleton: a later `run(cfg)` from Python would
    # take that app's output folder for its own (train.config.run_files.save_hydra_files).
    hydra_config = HydraConfig.instance()
    saved_hydra = hydra_config.cfg
    try:
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
        if cwd is not None:
            os.chdir(cwd)
        torch.set_num_threads(1)
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        for handler in root.handlers:
            if handler not in saved_handlers:
                with contextlib.suppress(Exception):
                    handler.close()
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        torch.set_num_threads(saved_threads)
        hydra_config.cfg = saved_hydra


@contextlib.contextmanager
def _captured_fds() -> Iterator[Callable[[], tuple[str, str]]]:
    """Point fds 1 and 2 (and sys.stdout/stderr) at temporary files for the block."""
    files = [tempfile.TemporaryFile(mode="w+b") for _ in range(2)]  # noqa: SIM115
    saved = []
    for fd, f in zip((1, 2), files, strict=True):
        sys.stdout.flush()
        sys.stderr.flush()
        saved.append(os.dup(fd))
        os.dup2(f.fileno(), fd)
    streams = sys.stdout, sys.stderr
    sys.stdout = open(1, "w", closefd=False, buffering=1, errors="replace")  # noqa: SIM115
    sys.stderr = open(2, "w", closefd=False, buffering=1, errors="replace")  # noqa: SIM115
    moved = _repoint_console_handlers(dict(zip(streams, (sys.stdout, sys.stderr), strict=True)))
    result: list[str] = []

    def read() -> tuple[str, str]:
        return result[0], result[1]

    try:
        yield read
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for handler, stream in moved.items():
            handler.setStream(stream)
        sys.stdout, sys.stderr = streams
        for fd, copy in zip((1, 2), saved, strict=True):
            os.dup2(copy, fd)
            os.close(copy)
        for f in files:
            f.seek(0)
            result.append(f.read().decode(errors="replace"))
            f.close()


def _repoint_console_handlers(streams: dict) -> dict:
    """Point the log handlers that write to one of `streams`' keys (the test process's
    stdout/stderr, taken when a library added a handler at import) at its value: in a fresh
    process they write to fds 1 and 2. Returns the moved {handler: old stream}."""
    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]  # fmt: skip
    moved = {}
    for handler in {h for lg in loggers for h in lg.handlers}:
        stream = getattr(handler, "stream", None)
        if isinstance(handler, logging.StreamHandler) and stream in streams:
            moved[handler] = handler.setStream(streams[stream])
    return moved


def run_env(root: Path) -> dict[str, str]:
    """This process's environment, with outputs (MLflow store included) under ``root``.

    MLflow's `set_tracking_uri` exports MLFLOW_TRACKING_URI, so an in-process run of an earlier
    test would otherwise send these subprocesses' runs to that test's store.
    """
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    # PYTHONFAULTHANDLER: a subprocess that aborts (SIGABRT at exit) prints its Python stacks.
    return env | {"LDM_OUTPUT_DIR": str(root), "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
