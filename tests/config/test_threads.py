"""Threads per training process (train/config/threads.py): a share of the CPUs the process may
use, the user's OMP_NUM_THREADS or `threads` setting first; idle OpenMP threads spin briefly."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from train.config.resolvers import available_cpus
from train.config.threads import intra_op_threads, set_omp_defaults


@pytest.mark.parametrize(
    ("requested", "local", "environ", "cpus", "expected"),
    [
        (None, 1, {}, 8, 8),  # alone on the node: every CPU it may use
        (None, 2, {}, 8, 4),  # two ranks of a node: half each
        (None, 3, {}, 8, 2),  # rounded down: 3 x 2 <= 8
        (None, 4, {}, 2, 1),  # more ranks than CPUs: never 0
        (None, 2, {"OMP_NUM_THREADS": "3"}, 8, None),  # exported: left to torch, which reads it
        (6, 2, {"OMP_NUM_THREADS": "3"}, 8, 6),  # the setting wins over everything
    ],
)
def test_threads_are_a_share_of_the_cpus_unless_set(
    requested: int | None, local: int, environ: dict, cpus: int, expected: int | None
) -> None:
    assert intra_op_threads(requested, local, environ, cpus) == expected


def test_the_share_counts_the_cpus_this_process_may_use() -> None:
    assert intra_op_threads(None, 1, {}) == available_cpus()


def test_zero_threads_is_refused() -> None:
    with pytest.raises(ValueError, match="threads=0"):
        intra_op_threads(0, 1, {})


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, {"GOMP_SPINCOUNT": "1000"}),
        ({"GOMP_SPINCOUNT": "300000"}, {"GOMP_SPINCOUNT": "300000"}),  # the user's choice
        ({"OMP_WAIT_POLICY": "ACTIVE"}, {"OMP_WAIT_POLICY": "ACTIVE"}),  # a policy: no count
    ],
)
def test_idle_openmp_threads_spin_briefly_unless_the_user_chose(environ: dict, expected: dict):
    set_omp_defaults(environ)
    assert environ == expected


def test_ldm_train_sets_the_spin_before_torch_loads(tmp_path) -> None:
    """OpenMP reads GOMP_SPINCOUNT when torch loads: ldm-train's main sets it first (here it
    stops at the first config error, before anything else)."""
    code = (
        "import os, sys\n"
        "sys.argv = ['ldm-train', 'trainer.max_stepz=1']\n"
        "import train.cli.train as t\n"
        "try:\n    t.main()\nexcept SystemExit:\n    pass\n"
        "print(os.environ.get('GOMP_SPINCOUNT'), 'torch' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=120)  # fmt: skip
    assert out.stdout.split()[-2:] == ["1000", "False"], out.stderr[-2000:]
