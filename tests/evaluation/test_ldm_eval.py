"""`ldm-eval EXPORT --reference`: FID, KID and CLIP score of any export on a prompt set or a
validation set's captions (and the shapes checker when those are shapes captions)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from cli_runner import run_cli

from train.cli.evaluate import main as eval_main


def test_ldm_eval_scores_an_export_on_the_validation_captions(
    tiny_run, demo_shards: Path, tiny_clip_dir: Path, reference_16px: Path, tmp_path: Path
) -> None:
    run_dir, _ = tiny_run
    out = tmp_path / "scores.json"
    proc = run_cli(eval_main, ["ldm-eval", str(run_dir / "export"), "--reference",
                               str(reference_16px), "--val-urls", str(demo_shards),
                               "--clip-model", str(tiny_clip_dir), "--num-samples", "8",
                               "--steps", "2", "--json", str(out)])  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    scores = json.loads(out.read_text())
    assert scores["num_samples"] == 8
    assert {"fid", "kid", "kid_std", "clip_score"} <= scores.keys()
    assert all(math.isfinite(scores[k]) for k in ("fid", "kid", "clip_score"))
    assert scores["fid"] > 0  # 4 steps of training are far from the real images
    # The demo set's captions are shapes captions: the checker scores them too.
    assert {"shapes_colour", "shapes_position", "shapes_shape"} <= scores.keys()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--clip-model", "CLIP", "--prompts", "EMPTY"], "--prompts=.*empty.txt: the file hol"),
        (["--val-urls", "SHARDS"], "needs the extractor it was made with"),
        (["--clip-model", "ROOT/nope", "--prompts", "EMPTY"], "holds no prompt"),
        (["--clip-model", "ROOT/nope", "--val-urls", "SHARDS"], "-model .*nope: no such CLIP"),
        (["--clip-model", "CLIP", "--val-urls", "SHARDS", "--reference", "REF32"],
         "--reference=.*ref32.safetensors was made at 32 px, the images here are 16 px"),
        (["--clip-model", "CLIP", "--val-urls", "OTHER"],
         "--reference: reference statistics .* belong to another set .*recompute with `ldm-da"),
    ],
    ids=["empty-prompts", "no-extractor", "prompts-first", "missing-clip", "resolution",
         "other-set"],
)
def test_ldm_eval_bad_quality_inputs_exit_2_before_generation(
    args, message, tiny_run, demo_shards: Path, tiny_clip_dir: Path, reference_16px: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    import re

    run_dir, _ = tiny_run
    (tmp_path / "empty.txt").write_text("\n\n")
    if "REF32" in args:
        from train.evaluation.features import ClipImageFeatures
        from train.evaluation.reference import compute_reference

        feature = ClipImageFeatures(str(tiny_clip_dir))
        compute_reference(str(demo_shards), feature, tmp_path / "ref32.safetensors", 32)
    if "OTHER" in args:
        from data.shards import write_demo_shards

        write_demo_shards(tmp_path / "other", num_samples=32, samples_per_shard=32, size=32, seed=2)
    args = [a.replace("OTHER", str(tmp_path / "other"))
            .replace("EMPTY", str(tmp_path / "empty.txt")).replace("SHARDS", str(demo_shards))
            .replace("ROOT", str(tmp_path)).replace("CLIP", str(tiny_clip_dir))
            .replace("REF32", str(tmp_path / "ref32.safetensors"))
            for a in args]  # fmt: skip
    proc = run_cli(eval_main, ["ldm-eval", str(run_dir / "export"), "--reference",
                               str(reference_16px), *args])  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert re.search(message, proc.stderr), proc.stderr
