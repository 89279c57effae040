"""What the benchmark scripts report about the machine they ran on."""

from __future__ import annotations

import platform
import subprocess
import time
from collections.abc import Callable


def cpu_model() -> str:
    """lscpu's model name (every timing names its CPU)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return platform.processor() or "unknown"
    names = [ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")]
    return names[0] if names else platform.processor() or "unknown"


def step_times(step: Callable[[], None], device_type: str, warmup: int, steps: int) -> list[float]:
    """Seconds of each of ``steps`` calls after ``warmup`` untimed ones, synchronised on CUDA
    (kernels run asynchronously there)."""
    import torch

    times = []
    for i in range(warmup + steps):
        if device_type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device_type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times
