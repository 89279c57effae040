"""Install what the test suite uses besides the project, before pytest starts (`make test`).

Each of these is built once per machine and reused, and would otherwise be paid inside the
first test that needs it (about 2.5 minutes on a fresh 2-core machine): SLURM, munge,
slurmdbd and MariaDB from apt for the local cluster; img2dataset's own virtualenv; DeepSpeed's
CPU ops (the shared-memory all-reduce every CPU DeepSpeed run loads, and the CPU Adam of the
offload configs), which DeepSpeed otherwise compiles on first use. A step that fails is
reported and skipped: the tests that need it then fail with its own message.

    python tests/prepare.py
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable

from img2dataset_env import ensure_img2dataset_venv  # beside this script: on sys.path
from support.slurm_local import install


def build_deepspeed_cpu_ops() -> None:
    """DeepSpeed JIT-compiles these into ~/.cache/torch_extensions on first use (with the
    `ninja` first on PATH: run this with the PATH the tests get, or ninja rebuilds them)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.accelerator import get_accelerator

    for op in ("ShareMemCommBuilder", "CPUAdamBuilder"):
        get_accelerator().create_op_builder(op).load()


STEPS: list[tuple[str, Callable[[], object]]] = [
    ("SLURM, munge, slurmdbd and MariaDB", lambda: install(accounting=True)),
    ("img2dataset virtualenv", ensure_img2dataset_venv),
    ("DeepSpeed CPU ops", build_deepspeed_cpu_ops),
]


def main() -> int:
    for name, step in STEPS:
        t0 = time.monotonic()
        try:
            step()
        except Exception:  # reported; the tests that need it say what is missing
            print(f"test tools: {name} FAILED:\n{traceback.format_exc()}", file=sys.stderr)
            continue
        print(f"test tools: {name} ready ({time.monotonic() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
