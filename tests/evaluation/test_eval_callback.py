"""`callbacks/eval=clip` in a tiny run: FID, KID and CLIP score every N steps and at the end, in
the run's MLflow metrics and on the model version the run registered; bad settings refused
before training."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from train.cli.run import RUN_ID_FILE, run
from train.config.compose import compose
from train.errors import ConfigError


def eval_overrides(root: Path, shards: Path, clip: Path, reference: Path) -> list[str]:
    return [f"paths.root={root}", "experiment=tiny", f"data.urls={shards}",
            f"data.val_urls={shards}", "callbacks/eval=clip", f"callbacks.eval.clip_model={clip}",
            f"callbacks.eval.reference={reference}", "callbacks.eval.every_n_steps=2",
            "callbacks.eval.num_images=8", "callbacks.eval.num_inference_steps=2",
            "callbacks.eval.batch_size=4"]  # fmt: skip


def test_metrics_are_logged_per_step_and_put_on_the_model_version(
    demo_shards: Path, tiny_clip_dir: Path, reference_16px: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # What a sweep optimises: run() returns it (train/cli/run.py).
    cfg = compose([*eval_overrides(tmp_path, demo_shards, tiny_clip_dir, reference_16px),
                   "optimized_metric=eval/fid"])  # fmt: skip
    returned = run(cfg)
    client = MlflowClient(tracking_uri=cfg.logger.mlflow.tracking_uri)
    run_id = (Path(cfg.paths.run_dir) / RUN_ID_FILE).read_text().strip()
    histories = {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k))
                 for k in ("eval/fid", "eval/kid", "eval/clip_score")}  # fmt: skip
    print(histories)
    for key, history in histories.items():
        assert [s for s, _ in history] == [2, 4], key  # every 2 steps, and the end (step 4)
        assert all(math.isfinite(v) for _, v in history), key
    assert all(v > 0 for _, v in histories["eval/fid"])  # generated vs real: never identical
    assert returned == pytest.approx(histories["eval/fid"][-1][1])
    (version,) = client.search_model_versions(f"run_id='{run_id}'")
    assert float(version.tags["eval.fid"]) == pytest.approx(histories["eval/fid"][-1][1])
    assert float(version.tags["eval.clip_score"]) == pytest.approx(
        histories["eval/clip_score"][-1][1]
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("callbacks.eval.reference={missing}", "do not exist; write them with `ldm-data stats"),
        ("callbacks.eval.prompts={empty}", "the file holds no prompt"),
        ("callbacks.eval.clip_model={missing}", "CLIP model folder .* does not exist"),
        ("data.val_urls={other}", "belong to another set"),
        ("callbacks.eval.reference={ref32}", "made at 32 px, the images here are 16 px"),
    ],
    ids=["reference", "prompts", "extractor", "set", "resolution"],
)
def test_bad_evaluation_settings_fail_before_training(
    change: str, message: str, demo_shards: Path, tiny_clip_dir: Path, reference_16px: Path,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    from data.shards import write_demo_shards

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "empty.txt").write_text("\n  \n")
    other = tmp_path / "other"
    if "other" in change:
        write_demo_shards(other, num_samples=32, samples_per_shard=32, size=32, seed=2)
    ref32 = tmp_path / "ref32.safetensors"
    if "ref32" in change:
        from train.evaluation.features import ClipImageFeatures
        from train.evaluation.reference import compute_reference

        compute_reference(str(demo_shards), ClipImageFeatures(str(tiny_clip_dir)), ref32, 32)
    override = change.format(missing=tmp_path / "missing", empty=tmp_path / "empty.txt",
                             other=other, ref32=ref32)  # fmt: skip
    cfg = compose([*eval_overrides(tmp_path, demo_shards, tiny_clip_dir, reference_16px),
                   override, "logger=none"])  # fmt: skip
    with pytest.raises(ConfigError, match=message):
        run(cfg)
    # Refused while the callbacks are built: before the model, the data and any step.
    assert not (Path(cfg.paths.run_dir) / "checkpoints").exists()
