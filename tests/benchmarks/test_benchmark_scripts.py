"""The GPU benchmarks' own smoke modes, on CPU: a script that no CI run executes rots (an import
renamed under it) until the one session with a GPU finds it broken."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_mfu_tiny_on_cpu_counts_flops_and_times_steps(tmp_path: Path) -> None:
    out = tmp_path / "mfu.json"
    proc = subprocess.run(
        [sys.executable, ROOT / "benchmarks" / "mfu.py", "--tiny", "--device", "cpu",
         "--batch", "2", "--steps", "2", "--warmup", "1", "--out", out],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["card"] == "cpu" and result["batch"] == 2
    assert 0.5 < result["unet_params_m"] < 10  # model/backbone=unet_tiny, not the SD-2 UNet
    assert result["median_step_s"] > 0 and result["mfu"] is None  # no peak FLOPs for a CPU
    # FLOPs per step = TFLOP/s x step time: a forward + backward of the tiny UNet at 8x8 latents,
    # 2 samples, is tens of MFLOPs to a few GFLOPs, never zero.
    flops = result["tflops_per_s"] * 1e12 * result["median_step_s"]
    assert 1e7 < flops < 1e10
    assert "samples/s" in proc.stdout and "MFU n/a" in proc.stdout
