"""Uneven shards across DDP ranks and workers, and exact mid-epoch resume after a SIGKILL.

Both run real Lightning processes (``tests/data/scripts/data_run.py``): DDP over gloo with 2 ranks
× 2 workers, and a single process killed mid-epoch and resumed from its last checkpoint.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from support.stacks import excerpt, run_or_dump

from data.shapes import render, train_specs
from data.shards import jpeg_bytes, write_shards

SCRIPT = Path(__file__).parent / "scripts" / "data_run.py"
SIZES = [3, 40, 7, 25, 12, 31, 18]  # 136 samples in 7 very uneven shards


@pytest.fixture(scope="module")
def uneven(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("uneven")
    specs = train_specs()
    for s, n in enumerate(SIZES):
        samples = []
        for i in range(n):
            spec = specs[(s * 50 + i) % len(specs)]
            image = render(spec, 16, np.random.default_rng(s * 1000 + i))
            samples.append(
                {"__key__": f"s{s}-{i:03d}", "jpg": jpeg_bytes(image), "txt": spec.caption}
            )
        write_shards(samples, str(out / f"uneven{s}-%06d.tar"), maxcount=1000)
    return str(out / "uneven{0..6}-000000.tar")


# Two ranks start together under torchrun (Lightning's launcher would start rank 1 only once
# rank 0 built its Trainer); the split is the same either way.
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]


def _run(
    urls: str, out: Path, *args: str, check: bool = True, ranks: int = 1
) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    launcher = TORCHRUN if ranks == 2 else []
    devices = ["--devices", str(ranks)] if ranks > 1 else []
    cmd = [sys.executable, *launcher, str(SCRIPT), urls, str(out), *devices, *args]
    proc = run_or_dump(cmd, env, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{excerpt(proc.stderr, 4000)}")
    return proc


def _records(out: Path, rank: int = 0) -> list[dict]:
    lines = (out / f"keys-rank{rank}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_uneven_shards_two_ranks_two_workers(uneven: str, tmp_path: Path) -> None:
    _run(uneven, tmp_path, "--workers", "2", "--epochs", "2", ranks=2)
    ranks = [_records(tmp_path, r) for r in (0, 1)]
    # Every rank ran the same steps: 136 samples / 4 readers = 34 each -> 8 batches of 4 per
    # worker, 16 per rank per epoch.
    assert [len(r) for r in ranks] == [32, 32]
    assert [rec["step"] for rec in ranks[0]] == [rec["step"] for rec in ranks[1]]
    per_epoch: dict[int, list[str]] = defaultdict(list)
    for records in ranks:
        for rec in records:
            assert len(rec["keys"]) == 4
            per_epoch[rec["epoch"]].extend(rec["keys"])
    for keys in per_epoch.values():
        assert len(keys) == 128 and len(set(keys)) == 128  # no sample read twice in an epoch
    assert per_epoch[0] != per_epoch[1]
    assert json.loads((tmp_path / "done.json").read_text())["global_step"] == 32
    # DataHealthMonitor gathered both ranks' loader rates to rank 0's logger.
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    for rank in (0, 1):
        rates = [float(r[f"data/rank{rank}/samples_per_sec"]) for r in rows if r.get("step")]
        assert len(rates) == 8 and all(v > 0 for v in rates)  # every 4 of 32 steps


@pytest.fixture(scope="module")
def uninterrupted(uneven: str, tmp_path_factory: pytest.TempPathFactory) -> dict[int, list]:
    """The keys every step of an uninterrupted 2-epoch run consumed: step -> keys."""
    full = tmp_path_factory.mktemp("full")
    _run(uneven, full, "--epochs", "2")
    return {rec["step"]: rec["keys"] for rec in _records(full)}


@pytest.mark.parametrize(("ckpt_every", "kill_at"), [(13, 44), (5, 12)])
def test_exact_resume_after_sigkill(
    uneven: str, uninterrupted: dict[int, list], tmp_path: Path, ckpt_every: int, kill_at: int
) -> None:
    cut = tmp_path / "cut"
    reference = uninterrupted
    assert len(reference) == 68  # 136 / 2 workers / 4 = 17 batches per worker, 2 epochs

    killed = _run(
        uneven,
        cut,
        "--epochs",
        "2",
        "--ckpt-every",
        str(ckpt_every),
        "--kill-at-step",
        str(kill_at),
        check=False,
    )
    assert killed.returncode == -9
    ckpts = sorted((cut / "ckpt").glob("*.ckpt"), key=lambda p: int(p.stem.split("step=")[1]))
    last = ckpts[-1]
    saved_step = int(last.stem.split("step=")[1])
    assert saved_step == kill_at // ckpt_every * ckpt_every
    # The data position Lightning stored with the fit loop: epoch, batches consumed in it.
    loops = torch.load(last, weights_only=True)["loops"]["fit_loop"]["state_dict"]
    (position,) = loops["combined_loader"]
    epoch, consumed = divmod(saved_step, 34)
    assert (position["epoch"], position["consumed"]) == (epoch, consumed)
    assert position["batches_per_worker"] == [(consumed + 1) // 2, consumed // 2]
    before = {rec["step"]: rec["keys"] for rec in _records(cut)}
    assert max(before) == kill_at - 1

    (cut / "keys-rank0.jsonl").unlink()
    _run(uneven, cut, "--epochs", "2", "--resume", str(last))
    after = {rec["step"]: rec["keys"] for rec in _records(cut)}
    assert sorted(after) == list(range(saved_step, 68))
    assert after == {step: reference[step] for step in range(saved_step, 68)}
