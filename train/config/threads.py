"""CPU threads per training process, from the CPUs it may use and the processes beside it.

PyTorch starts one intra-op thread per CPU of its affinity mask, whatever a cgroup quota allows
(a container limited to 2 CPUs on a 64-core host starts 64) and however many ranks share the
node, and GNU OpenMP's idle threads spin-wait for the next parallel region. The processes then
oversubscribe the CPUs, and the spinning threads take the time the working ones need: a step
ran at 0.19x its speed alone instead of the fair 0.5x (`benchmarks/threads_shared.py`). So each
process takes an equal share of the CPUs it may use, and idle OpenMP threads spin 1,000 times
before they sleep instead of GNU OpenMP's 300,000: beside a second job that kept 0.44x instead
of 0.19x, at the speed alone of the long spin (within run-to-run noise), where sleeping at once
(OMP_WAIT_POLICY=PASSIVE) cost a process alone 25-30 % (figures in docs/scaling-out.md).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping

from train.config.resolvers import available_cpus

# Read by GNU OpenMP when it loads (with torch): set before anything imports torch.
SPIN = {"GOMP_SPINCOUNT": "1000"}
WAIT_KEYS = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")


def set_omp_defaults(environ: MutableMapping[str, str] = os.environ) -> None:
    """Short spin-waits for idle OpenMP threads, unless the user chose how they wait."""
    if not any(key in environ for key in WAIT_KEYS):
        environ.update(SPIN)


def intra_op_threads(
    requested: int | None,
    local_processes: int,
    environ: Mapping[str, str] = os.environ,
    cpus: int | None = None,
) -> int | None:
    """Threads for torch in one of `local_processes` training processes on this node:
    `requested` (the `threads` setting) when given; None (leave torch's) when OMP_NUM_THREADS is
    exported (the user's choice, or torchrun's 1 per rank); else an equal share of `cpus` (the
    CPUs this process may use), at least 1."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"threads={requested}: give a number of threads >= 1, or null")
        return requested
    if "OMP_NUM_THREADS" in environ:
        return None
    return max(1, (cpus or available_cpus()) // max(1, local_processes))


def apply_threads(requested: int | None, local_processes: int) -> int:
    """Set torch's intra-op threads as `intra_op_threads` decides; returns the count in use."""
    import torch

    threads = intra_op_threads(requested, local_processes)
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()
