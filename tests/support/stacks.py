"""Subprocess runs that, when they hang, fail with every process's Python stacks.

A multi-process run (torchrun, its ranks, their DataLoader workers) that hangs once in a few
hundred runs leaves nothing to debug from but "timed out after 300 s". Here the command runs in
a session of its own with PYTHONFAULTHANDLER=1; on timeout the whole session gets SIGABRT, on
which faulthandler writes each Python process's threads' stacks to its stderr, and that stderr
becomes the failure message. (An abort at exit, "terminate called without an active exception",
dumps the same way.)
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence

FAULT_ENV = {"PYTHONFAULTHANDLER": "1"}


def run_or_dump(
    cmd: Sequence[str], env: Mapping[str, str], timeout: float, tail: int = 20000
) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)`, except
    that a timeout raises AssertionError with the last `tail` characters of every process's
    stack dump and output, and no process of the run is left behind."""
    proc = subprocess.Popen(
        [str(c) for c in cmd], env={**env, **FAULT_ENV}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _signal_session(proc.pid, signal.SIGABRT)
        try:
            out, err = proc.communicate(timeout=30)
        finally:
            _signal_session(proc.pid, signal.SIGKILL)
        raise AssertionError(
            f"{' '.join(map(str, cmd))} hung for {timeout:.0f} s; the stacks of its processes "
            f"at SIGABRT, and its output:\n{out[-2000:]}\n{err[-tail:]}"
        ) from None
    finally:
        if proc.poll() is None:  # an error in the test itself: no rank outlives it
            _signal_session(proc.pid, signal.SIGKILL)
            proc.wait()
    _signal_session(proc.pid, signal.SIGKILL)  # a worker the run orphaned
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _signal_session(pid: int, sig: signal.Signals) -> None:
    # The session's process group has the command's pid as its id (start_new_session).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
