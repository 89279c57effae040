"""Files that would run code when loaded: a checkpoint smuggling a pickled object, sharded
checkpoint folders (read by unpickling readers), and shards with pickle members. None of them
runs anything; each is refused or ignored with a clear message."""

from __future__ import annotations

import io
import pickle
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli
from PIL import Image

from train.cli.export import main as export_main

LDM_EXPORT = str(Path(sys.executable).parent / "ldm-export")


class Payload:
    """Unpickling this creates `marker`: proof that code from the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.slow
def test_a_checkpoint_with_a_pickled_object_is_refused(train, tmp_path: Path) -> None:
    train("trainer.max_steps=2", "callbacks.checkpoint.every_n_train_steps=2", "logger=none")
    good = tmp_path / "runs" / "tiny" / "checkpoints" / "last.ckpt"
    marker = tmp_path / "pwned"
    state = torch.load(good, weights_only=True)
    state["callbacks"]["evil"] = Payload(marker)
    evil = tmp_path / "evil.ckpt"
    torch.save(state, evil)

    proc = train("trainer.max_steps=4", f"ckpt_path={evil}", "logger=none", expect=2)
    assert f"ckpt_path={evil}: cannot be loaded: UnpicklingError" in proc.stderr
    export = run_cli(export_main, [LDM_EXPORT, str(evil), str(tmp_path / "out")])
    assert export.returncode != 0 and "Weights only load failed" in export.stderr
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_sharded_checkpoint_folders_need_allow_pickle(tmp_path: Path) -> None:
    folder = tmp_path / "last.ckpt"
    (folder / "checkpoint").mkdir(parents=True)
    (folder / "latest").write_text("checkpoint")
    proc = run_cli(export_main, [LDM_EXPORT, str(folder), str(tmp_path / "out")])
    assert proc.returncode == 2  # bad input: one line, exit 2 (train/errors.py)
    assert "is a sharded checkpoint folder" in proc.stderr and "--allow-pickle" in proc.stderr


def pickle_shard(path: Path, marker: Path, n: int = 8) -> None:
    """img2dataset-layout samples, each also carrying `.pyd` and `.pickle` members."""
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            img = io.BytesIO()
            Image.new("RGB", (16, 16), (40 * i % 256, 90, 200)).save(img, "PNG")
            members = {"png": img.getvalue(), "txt": f"sample {i}".encode(),
                       "pyd": pickle.dumps(Payload(marker)),
                       "pickle": pickle.dumps(Payload(marker))}  # fmt: skip
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.mark.slow
def test_pickle_members_of_shards_are_never_unpickled(train, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    (tmp_path / "shards").mkdir()
    pickle_shard(tmp_path / "shards" / "evil-000000.tar", marker)
    train(f"data.urls={tmp_path / 'shards'}", "trainer.max_steps=2", "logger=none")
    assert not marker.exists()
    assert (tmp_path / "runs" / "tiny" / "export" / "model_index.json").is_file()
