"""Bad input through every console script: one line on stderr naming the file or setting (and
the fix), exit 2, no traceback, before any model is built; the traceback only on request
(`--debug`, HYDRA_FULL_ERROR=1). The rule lives in train/errors.py.

Run in the test process (tests/cli_runner.py): the subject is what each script prints and
exits with, not the process. Times are printed, not asserted (they are a second or less here;
in a fresh process add the script's imports, which the checks run before).
"""

from __future__ import annotations

import io
import os
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cli_runner import run_cli
from PIL import Image


def _data_main() -> None:
    from train.cli.data import main

    sys.exit(main())  # as the console script's wrapper does with the returned code


def _entry(script: str) -> Callable[[], object]:
    from jobs.submit import cli as submit_cli
    from train.cli.evaluate import main as eval_main
    from train.cli.export import main as export_main
    from train.cli.mlflow_sync import main as sync_main
    from train.cli.sample import main as sample_main
    from train.cli.train import main as train_main

    return {"ldm-train": train_main, "ldm-data": _data_main, "ldm-export": export_main,
            "ldm-sample": sample_main, "ldm-eval": eval_main,
            "ldm-submit": submit_cli, "ldm-mlflow-sync": sync_main}[script]  # fmt: skip


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, demo_shards: Path) -> dict[str, str]:
    """Tiny bad inputs: uncaptioned shards and images, a fake export, a non-checkpoint."""
    root = tmp_path_factory.mktemp("bad_inputs")
    png = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 40, 40)).save(png, "PNG")
    (root / "nocap").mkdir()
    with tarfile.open(root / "nocap" / "s-000000.tar", "w") as tar:
        for i in range(4):  # images only: no KEY.txt
            info = tarfile.TarInfo(f"{i:06d}.png")
            info.size = len(png.getvalue())
            tar.addfile(info, io.BytesIO(png.getvalue()))
    (root / "videos").mkdir()  # a video shard: only its member names are read before a start
    with tarfile.open(root / "videos" / "v-000000.tar", "w") as tar:
        for name, data in (("000000.mp4", b"not decoded"), ("000000.txt", b"a clip")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (root / "images").mkdir()
    (root / "images" / "a.png").write_bytes(png.getvalue())
    (root / "export").mkdir()  # looks like an export to a quick glance, names no pipeline
    (root / "export" / "model_index.json").write_text("{}")
    (root / "empty").mkdir()
    (root / "bad.ckpt").write_bytes(b"not a checkpoint")
    (root / "spool").mkdir()  # a spool whose run never recorded its tracking URI
    (root / "spool" / "ops.jsonl").write_text("")
    (root / "vae").mkdir()  # a local pretrained VAE: only its config.json is read
    (root / "vae" / "config.json").write_text('{"block_out_channels": [8, 8, 8]}')
    return {"ROOT": str(root), "SHARDS": str(demo_shards)}


# (script, argv with ROOT/SHARDS placeholders, text the one line must contain)
CASES = [
    ("ldm-train", ["experiment=tiny", "data.urls=SHARDS", "trainer.max_steps=-5"],
     "trainer.max_steps=-5 is out of range"),
    ("ldm-train", ["experiment=tiny", "data.urls=SHARDS", "threads=0"],
     "threads=0 is out of range; set threads to 1 or more CPU threads per process, or null"),
    ("ldm-train", ["experiment=tiny", "data.urls=SHARDS", "data.resolution=64"],
     "set data.resolution=16 or model.backbone.model.sample_size=32"),
    ("ldm-train", ["experiment=tiny", "data.urls=SHARDS", "model/vae=pretrained",
                   "model.vae.pretrained_model_name_or_path=ROOT/vae"],
     "VAE downsampling 4); set data.resolution=32 or model.backbone.model.sample_size=4"),
    ("ldm-train", ["experiment=tiny", "data.urls=ROOT/nocap"], "data.caption_fields=txt"),
    ("ldm-train", ["experiment=tiny", "trainer.max_stepz=3"], "+trainer.max_stepz=3"),
    ("ldm-train", ["experiment=tiny", "data.urls=SHARDS", "+data/video=clips"],
     "hold jpg members and no mp4|webm|mkv; these are image shards: drop +data/video"),
    ("ldm-train", ["experiment=tiny", "data.urls=ROOT/videos"],
     "hold mp4 members and no jpg|jpeg|png|webp; these are video shards: read them with"),
    ("ldm-train", ["experiment=tiny", "data.urls=ROOT/videos", "+data/video=clips",
                   "data.video.num_frames=8"],
     "data.video.num_frames=8: the model takes 4k+1 frames (data.video.rule); the nearest "
     "valid counts are 5 or 9"),
    ("ldm-train", ["experiment=nope"],
     "Available options in 'experiment': controlnet, controlnet_sd3, demo"),
    ("ldm-data", ["from-folder", "ROOT/images", "ROOT/out"], "has a NAME.txt caption"),
    ("ldm-data", ["encode", "ROOT/enc", "experiment=tiny", "data.urls=ROOT/nocap"],
     "data.urls='ROOT/nocap': none of the first 4 samples"),
    ("ldm-data", ["validate", "SHARDS", "--workers", "x"], "argument --workers"),
    ("ldm-export", ["ROOT/export", "ROOT/out"], "is an export (a diffusers folder)"),
    ("ldm-export", ["ROOT/bad.ckpt", "ROOT/out"], "ROOT/bad.ckpt is not a checkpoint"),
    ("ldm-export", ["ROOT/empty", "ROOT/out"], "not a sharded DeepSpeed/FSDP checkpoint"),
    ("ldm-export", ["ROOT/missing.ckpt", "ROOT/out"], "checkpoint ROOT/missing.ckpt does not"),
    ("ldm-sample", ["ROOT/empty", "--prompt", "a"], "ROOT/empty has no model_index.json"),
    ("ldm-sample", ["ROOT/export", "--prompt", "a"], "names no pipeline class (_class_name)"),
    ("ldm-sample", ["ROOT/bad.ckpt", "--prompt", "a"], "export it first: ldm-export"),
    ("ldm-sample", ["ROOT/empty", "--prompt", "a", "--steps", "0"], "--steps: 0 must be at"),
    ("ldm-eval", ["ROOT/missing"], "export folder ROOT/missing does not exist"),
    ("ldm-eval", ["ROOT/empty", "--num-samples", "0"], "--num-samples: 0 must be at least 1"),
    ("ldm-submit", ["launcher=nope", "experiment=tiny"], "Could not find 'launcher/nope'"),
    ("ldm-submit", ["--nodes", "2", "launcher=slurm"], "unrecognized arguments: --nodes"),
    ("ldm-mlflow-sync", ["ROOT/empty"], "ROOT/empty is neither an MLflow spool nor a run"),
    ("ldm-mlflow-sync", ["ROOT/spool"], "ROOT/spool names no tracking URI: pass --tracking-uri"),
    ("ldm-mlflow-sync", ["ROOT/empty", "--wait", "soon"], "argument --wait: invalid float"),
]  # fmt: skip


def _fill(text: str, inputs: dict[str, str]) -> str:
    return text.replace("SHARDS", inputs["SHARDS"]).replace("ROOT", inputs["ROOT"])


def _run(script: str, argv: list[str], inputs: dict[str, str], tmp_path: Path, **env: str):
    # MLflow's set_tracking_uri exports MLFLOW_TRACKING_URI: an earlier in-process run's store
    # must not become the tracking URI of a case here.
    environ = {k: v for k, v in os.environ.items()
               if k not in ("HYDRA_FULL_ERROR", "MLFLOW_TRACKING_URI")}  # fmt: skip
    environ |= {"LDM_OUTPUT_DIR": str(tmp_path), "HF_HUB_OFFLINE": "1", **env}
    entry = _entry(script)
    start = time.perf_counter()
    proc = run_cli(entry, [script, *(_fill(a, inputs) for a in argv)], env=environ)
    return proc, time.perf_counter() - start


@pytest.mark.parametrize(("script", "argv", "expected"), CASES,
                         ids=[f"{s}-{i}" for i, (s, _, _) in enumerate(CASES)])  # fmt: skip
def test_bad_input_is_one_line_exit_2(script, argv, expected, inputs, tmp_path) -> None:
    proc, seconds = _run(script, argv, inputs, tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    print(f"{script} {' '.join(argv)}: exit {proc.returncode} in {seconds:.2f} s: {lines}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1, proc.stderr[-3000:]
    assert _fill(expected, inputs) in lines[0]
    assert seconds < 10  # generous: no model is built (about a second on 2 cores)
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize(
    ("script", "argv", "env"),
    [
        ("ldm-export", ["ROOT/missing.ckpt", "ROOT/out", "--debug"], {}),
        ("ldm-train", ["experiment=tiny", "data.urls=SHARDS", "trainer.max_steps=-5"],
         {"HYDRA_FULL_ERROR": "1"}),
    ],
)  # fmt: skip
def test_debug_shows_the_traceback(script, argv, env, inputs, tmp_path) -> None:
    proc, _ = _run(script, argv, inputs, tmp_path, **env)
    assert proc.returncode == 2
    assert "Traceback (most recent call last)" in proc.stderr
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert last.startswith((f"{script}:", "Config error:")), last  # the one line comes last
