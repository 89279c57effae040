"""Subprocess runs that, when they hang, fail with every process's Python stacks.

A multi-process run (torchrun, its ranks, their DataLoader workers) that hangs once in a few
hundred runs leaves nothing to debug from but "timed out after 300 s". Here the command runs in
a session of its own with PYTHONFAULTHANDLER=1; on timeout each process of the session gets
SIGABRT in turn, on which faulthandler writes its threads' Python stacks to its stderr, and
that stderr becomes the failure message. (An abort at exit, "terminate called without an
active exception", dumps the same way.)
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

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
        abort_each(proc.pid)
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


def abort_each(sid: int) -> None:
    """SIGABRT to each process of session `sid` (faulthandler dumps its stacks), one at a time,
    so that their dumps do not interleave on a shared stderr."""
    for pid in session_members(sid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGABRT)
        time.sleep(0.3)


def excerpt(err: str, tail: int = 5000) -> str:
    """The end of a failed run's stderr, after any faulthandler dumps (from "Fatal Python error"
    to their list of extension modules, which alone can fill the tail) and the C++ line before
    them ("terminate called ..."), so that neither is cut off."""
    dump = r"(terminate called[^\n]*\n)?Fatal Python error:.*?(?=\nExtension modules|\Z)"
    dumps = [m.group(0)[-4000:] for m in re.finditer(dump, err, flags=re.S)]
    return "\n".join([*dumps, err[-tail:]])


def session_members(sid: int) -> list[int]:
    """Pids of the processes in session `sid` (field 6 of /proc/PID/stat), oldest first."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # after the state: ppid, pgrp, session
            members.append(int(stat.parent.name))
    return sorted(members)


def _signal_session(pid: int, sig: signal.Signals) -> None:
    # The session's process group has the command's pid as its id (start_new_session).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
