"""A run that hangs fails with every process's Python stacks (tests/support/stacks.py), the
forked children (DataLoader workers) included, and leaves no process behind."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from support.stacks import excerpt, run_or_dump

HANGS = """
import multiprocessing as mp, os, time
def wait_in_worker():
    time.sleep(600)
if __name__ == "__main__":
    ctx = mp.get_context("fork")
    p = ctx.Process(target=wait_in_worker)
    p.start()
    open(os.environ["PIDS"], "w").write(f"{os.getpid()} {p.pid}")
    time.sleep(600)
"""


def test_a_hung_run_fails_with_the_stacks_of_its_processes(tmp_path: Path) -> None:
    script, pids = tmp_path / "hangs.py", tmp_path / "pids"
    script.write_text(HANGS)
    env = os.environ | {"PIDS": str(pids)}
    with pytest.raises(AssertionError) as failed:
        run_or_dump([sys.executable, str(script)], env, timeout=5)
    message = str(failed.value)
    assert "hung for 5 s" in message
    assert "in wait_in_worker" in message  # the forked child's stack
    assert message.count("Fatal Python error: Aborted") == 2  # and the parent's
    for pid in map(int, pids.read_text().split()):
        assert _state(pid) in ("gone", "Z")  # killed (an orphan stays a zombie until reaped)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


def test_a_failure_message_keeps_the_abort_and_its_stack_before_the_module_list() -> None:
    """faulthandler ends its dump with a list of every extension module (thousands of characters),
    which alone would fill the tail of stderr a failure shows."""
    err = ("terminate called without an active exception\nFatal Python error: Aborted\n\n"
           'Thread 0x1 (most recent call first):\n  File "run.py", line 3 in close\n\n'
           "Extension modules: " + "scipy.x, " * 2000 + "\ntorchrun: exitcode -6")  # fmt: skip
    out = excerpt(err, tail=300)
    assert out.startswith("terminate called without an active exception\nFatal Python error")
    assert 'File "run.py", line 3 in close' in out and out.endswith("torchrun: exitcode -6")
