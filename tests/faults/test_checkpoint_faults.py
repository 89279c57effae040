"""Kills and full disks injected into real runs: a SIGKILL at a random step resumes to the same
weights, optimizer state and sample sequence; a kill mid-write, a truncated checkpoint and a
full disk all leave a good checkpoint that resume picks."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import LDM_TRAIN, fault_env
from inject import consumed

pytestmark = pytest.mark.slow
STEPS = 12
RECORD = "+callbacks.record._target_=inject.RecordKeys"


def ckpt_dir(root: Path) -> Path:
    return root / "runs" / "tiny" / "checkpoints"


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def popen(root: Path, *overrides: str, shards: Path) -> subprocess.Popen:
    cmd = [LDM_TRAIN, "experiment=tiny", f"data.urls={shards}", *overrides]
    return subprocess.Popen(cmd, env=fault_env(root), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip


def kill_when(proc: subprocess.Popen, ready, timeout: float = 300, poll: float = 0.05) -> None:
    """SIGKILL the process group as soon as `ready()` holds (no handler, no cleanup runs)."""
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert proc.poll() is None, "the run ended before the fault was injected"
            assert time.monotonic() < deadline, "the fault point was never reached"
            time.sleep(poll)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_sigkill_at_a_random_step_resumes_to_the_uninterrupted_run(
    train_process, demo_shards: Path, tmp_path: Path
) -> None:
    common = [f"trainer.max_steps={STEPS}", "callbacks.checkpoint.every_n_train_steps=2",
              "logger=none"]  # fmt: skip
    ref_root, run_root = tmp_path / "ref", tmp_path / "faulted"
    keys_ref, keys_run = tmp_path / "ref_keys.tsv", tmp_path / "run_keys.tsv"
    train = train_process  # all three runs in processes of their own, to compare bit for bit
    train(*common, RECORD, f"+callbacks.record.path={keys_ref}", f"paths.root={ref_root}")

    at = random.Random().randrange(2, STEPS - 2, 2)  # printed by pytest on failure
    proc = popen(run_root, *common, RECORD, f"+callbacks.record.path={keys_run}",
                 shards=demo_shards)  # fmt: skip
    kill_when(proc, lambda: (ckpt_dir(run_root) / f"step_{at:07d}.ckpt").exists())
    # The kill may fall between step_<at>.ckpt and last.ckpt: resume takes the newest whole one.
    saved = [load(p)["global_step"] for p in ckpt_dir(run_root).glob("*.ckpt")]
    assert at <= max(saved) < STEPS, f"killed after step {at}"
    train(*common, RECORD, f"+callbacks.record.path={keys_run}", f"paths.root={run_root}",
          "ckpt_path=last")  # fmt: skip

    ref, got = load(ckpt_dir(ref_root) / "last.ckpt"), load(ckpt_dir(run_root) / "last.ckpt")
    assert got["global_step"] == ref["global_step"] == STEPS
    assert max_diff(ref["state_dict"], got["state_dict"]) == 0.0
    for o_ref, o_got in zip(ref["optimizer_states"], got["optimizer_states"], strict=True):
        for i, s in o_ref["state"].items():
            assert all(torch.equal(s[k], o_got["state"][i][k]) for k in s), i
    assert consumed(keys_run) == consumed(keys_ref)  # the same samples at every step
    assert len(consumed(keys_ref)) == STEPS


def test_kill_during_a_checkpoint_write_keeps_the_previous_one(
    train, demo_shards: Path, tmp_path: Path
) -> None:
    # A UNet wide enough that writing a checkpoint takes long enough to be caught mid-write.
    big = ["model.backbone.model.block_out_channels=[192,384]", "trainer.max_steps=6",
           "callbacks.checkpoint.every_n_train_steps=2", "logger=none"]  # fmt: skip
    proc = popen(tmp_path, *big, shards=demo_shards)
    folder = ckpt_dir(tmp_path)

    def writing_second() -> bool:
        return (folder / "step_0000002.ckpt").exists() and any(folder.glob(".*.tmp-*"))

    kill_when(proc, writing_second, poll=0.002)
    partial = list(folder.glob(".*.tmp-*"))
    assert partial, "killed mid-write: the temporary file is there"
    kept = load(folder / "step_0000002.ckpt")  # the previous checkpoint is whole
    assert kept["global_step"] == 2

    proc = train(*big, "ckpt_path=last")
    assert "Resuming from" in proc.stdout
    assert not list(folder.glob(".*.tmp-*"))  # interrupted writes cleaned up
    assert load(folder / "last.ckpt")["global_step"] == 6


def test_a_truncated_checkpoint_is_skipped_with_a_warning(train, tmp_path: Path) -> None:
    common = ["callbacks.checkpoint.every_n_train_steps=2", "logger=none"]
    train(*common, "trainer.max_steps=4")
    folder = ckpt_dir(tmp_path)
    last = folder / "last.ckpt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])  # what a non-atomic copy leaves when killed
    os.utime(last)  # and it is the newest file

    proc = train(*common, "trainer.max_steps=6", "ckpt_path=last")
    assert f"Skipping broken checkpoint {last}" in proc.stdout
    assert f"Resuming from {folder / 'step_0000004.ckpt'}" in proc.stdout
    assert load(folder / "last.ckpt")["global_step"] == 6


@pytest.fixture
def small_disk(tmp_path: Path):
    """A tmpfs of a given size (root: mount -t tmpfs), unmounted afterwards."""
    mounted: list[Path] = []

    def _mount(size_bytes: int) -> Path:
        where = tmp_path / "small_disk"
        where.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs",
                               str(where)], capture_output=True, text=True)  # fmt: skip
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")
        mounted.append(where)
        return where

    yield _mount
    for where in mounted:
        subprocess.run(["umount", str(where)], check=False)


def test_a_full_disk_fails_clearly_and_keeps_the_previous_checkpoint(
    train, tmp_path: Path, small_disk
) -> None:
    common = ["callbacks.checkpoint.every_n_train_steps=2", "logger=none"]
    train(*common, "trainer.max_steps=2", "paths.root=" + str(tmp_path / "probe"))
    size = (tmp_path / "probe" / "runs" / "tiny" / "checkpoints" / "last.ckpt").stat().st_size
    disk = small_disk(int(size * 2.5))  # room for step_2 and last.ckpt, not for step_4

    proc = train(*common, "trainer.max_steps=6", f"callbacks.checkpoint.dirpath={disk}",
                 expect=1)  # fmt: skip
    assert f"could not write checkpoint {disk}/step_0000004.ckpt: No space left" in proc.stderr
    assert "Checkpoints already there are intact (last.ckpt; step_0000002.ckpt)" in proc.stderr
    assert sorted(p.name for p in disk.iterdir()) == ["last.ckpt", "step_0000002.ckpt"]
    assert load(disk / "last.ckpt")["global_step"] == 2
    assert load(disk / "step_0000002.ckpt")["global_step"] == 2
