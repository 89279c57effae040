"""What a run records in MLflow, in the embedded SQLite store under paths.root (the default) and
on a real `mlflow server`: config params and the config file, metric histories, lineage tags,
sample images and the export as artifacts, the registered model version, and the same run after
a resume."""

from __future__ import annotations

import hashlib
import json
import math
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from train.cli.run import RUN_ID_FILE, run

REPO = Path(__file__).resolve().parents[2]
MAX_STEPS = 4
BATCH_SIZE = 4
# ThroughputMonitor only logs a rate once its window (100 batches by default) is full, and on one
# device it is named `train/device/samples_per_sec`; a window of 2 makes it appear in 4 steps.
THROUGHPUT_WINDOW = "+callbacks.throughput.window_size=2"


def compose_at(root: Path, *overrides: str):
    from hydra import compose, initialize_config_dir

    from train.config import resolvers as config
    from train.config.compose import CONFIG_DIR as CONF_DIR

    config.register()
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose("train", overrides=[f"paths.root={root}", *overrides])


@pytest.fixture(scope="module", params=["sqlite", "server"])
def tracked(request, tmp_path_factory, demo_shards):
    """One tiny run per store; yields (cfg, client, run_id)."""
    root = tmp_path_factory.mktemp(f"tracked-{request.param}")
    store = []
    if request.param == "server":
        store = [f"logger.mlflow.tracking_uri={request.getfixturevalue('mlflow_server').uri}"]
    common = ["experiment=tiny", "experiment_name=tracked", f"data.urls={demo_shards}",
              THROUGHPUT_WINDOW, *store]  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)  # the store must be the one we chose
        cfg = compose_at(root, *common)
        assert cfg.trainer.max_steps == MAX_STEPS and cfg.data.batch_size == BATCH_SIZE
        if not store:
            assert cfg.logger.mlflow.tracking_uri == f"sqlite:///{root}/mlflow.db"
        run(cfg)
        client = MlflowClient(tracking_uri=cfg.logger.mlflow.tracking_uri)
        run_id = (Path(cfg.paths.run_dir) / RUN_ID_FILE).read_text().strip()
        yield cfg, client, run_id, common


@pytest.fixture(scope="module")
def resumed(tracked, tmp_path_factory):
    """The same run resumed from last.ckpt up to step 6; with the files of registered version 1
    as they were before the resume (name -> SHA-256)."""
    cfg, client, run_id, common = tracked
    before = version_files(client, f"ldm-{cfg.experiment_name}", "1", tmp_path_factory)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        cfg2 = compose_at(Path(cfg.paths.root), *common, "ckpt_path=last", "trainer.max_steps=6")
        run(cfg2)
    return cfg2, before


def version_files(client: MlflowClient, name: str, version: str, tmp_factory) -> dict[str, str]:
    """What registered model version `version` serves, downloaded through the registry."""
    import mlflow.artifacts

    uri = client.get_model_version_download_uri(name, version)
    local = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=uri, dst_path=str(tmp_factory.mktemp("version")),
        tracking_uri=client.tracking_uri))  # fmt: skip
    return {str(f.relative_to(local)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(local.rglob("*")) if f.is_file()}  # fmt: skip


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_the_run_is_in_the_chosen_store(tracked):
    cfg, client, run_id, _ = tracked
    assert (
        Path(cfg.paths.root) / "mlflow.db"
    ).is_file() == cfg.logger.mlflow.tracking_uri.startswith("sqlite")
    experiment = client.get_experiment_by_name(cfg.experiment_name)
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]
    assert runs[0].info.status == "FINISHED"
    assert runs[0].info.run_name == cfg.run_name


def test_params_are_the_flattened_resolved_config(tracked):
    cfg, client, run_id, _ = tracked
    params = client.get_run(run_id).data.params
    assert params["trainer/max_steps"] == str(MAX_STEPS)
    assert params["data/batch_size"] == str(BATCH_SIZE)
    assert params["model/_target_"] == "train.tasks.latent_diffusion.LatentDiffusion"
    assert params["model/optimizer/lr"] == str(cfg.model.optimizer.lr)
    assert params["model/backbone/model/block_out_channels"] == "[32, 64]"
    assert params["paths/root"] == cfg.paths.root  # resolved, not "${abspath:...}"
    assert not any(k.startswith("hydra") for k in params)


def test_metric_histories(tracked):
    cfg, client, run_id, _ = tracked
    steps = list(range(MAX_STEPS))

    loss = history(client, run_id, "train/loss")
    assert [s for s, _ in loss] == steps
    assert all(math.isfinite(v) and v > 0 for _, v in loss)

    # Constant schedule with a 2-step linear warm-up, logged every step by LearningRateMonitor.
    lr, warmup = cfg.model.optimizer.lr, cfg.model.lr_scheduler.num_warmup_steps
    lrs = history(client, run_id, "lr-AdamW")
    assert [s for s, _ in lrs] == steps
    assert [v for _, v in lrs] == pytest.approx([lr * min(1.0, s / warmup) for s in steps])

    grad_norm = history(client, run_id, "train/grad_norm")
    assert [s for s, _ in grad_norm] == steps
    assert all(math.isfinite(v) and v > 0 for _, v in grad_norm)

    samples = history(client, run_id, "train/samples")
    assert samples == [(s, float(BATCH_SIZE * (s + 1))) for s in steps]
    rate = history(client, run_id, "train/device/samples_per_sec")
    assert rate and all(v > 0 for _, v in rate)

    skipped = history(client, run_id, "data/skipped_decode_error")
    assert [v for _, v in skipped] == [0.0] * MAX_STEPS  # the demo shards are clean
    # Per-rank data health (one rank here): loader rate and the wait for data between steps.
    rank_rate = history(client, run_id, "data/rank0/samples_per_sec")
    assert len(rank_rate) == MAX_STEPS and all(v > 0 for _, v in rank_rate)
    assert rank_rate == history(client, run_id, "data/samples_per_sec")
    waits = history(client, run_id, "data/rank0/wait_ms")
    assert len(waits) == MAX_STEPS and all(v >= 0 for _, v in waits)


def test_lineage_tags(tracked):
    _, client, run_id, _ = tracked
    tags = client.get_run(run_id).data.tags
    assert tags["host"] == platform.node()
    assert tags["command"] == shlex.join(sys.argv)
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False
    )
    if head.returncode == 0:
        assert tags["mlflow.source.git.commit"] == head.stdout.strip()
        assert tags["git.dirty"] in ("True", "False")
    else:
        assert "mlflow.source.git.commit" not in tags


def test_package_versions_and_dataset_lineage(tracked, demo_shards):
    from importlib import metadata

    _, client, run_id, _ = tracked
    tags = client.get_run(run_id).data.tags
    for package in ("torch", "lightning", "diffusers", "mlflow", "ldm-pipeline"):
        assert tags[f"version.{package}"] == metadata.version(package)
    assert tags["dataset.patterns"] == str(demo_shards)
    assert tags["dataset.num_shards"] == "2" and tags["dataset.num_samples"] == "64"
    manifest = client.download_artifacts(run_id, "dataset/dataset_manifest.tsv")
    rows = Path(manifest).read_text().splitlines()
    assert rows[0] == "split\tshard\tsamples\tweight" and len(rows) == 3
    assert {r.split("\t")[2] for r in rows[1:]} == {"32"}
    digest = hashlib.sha256(Path(manifest).read_bytes()).hexdigest()
    assert tags["dataset.manifest_sha256"] == digest
    requirements = Path(client.download_artifacts(run_id, "environment/requirements.txt"))
    assert f"torch=={metadata.version('torch')}" in requirements.read_text().splitlines()


def test_resolved_config_is_an_artifact(tracked):
    cfg, client, run_id, _ = tracked
    logged = yaml.safe_load(
        Path(client.download_artifacts(run_id, "config/config.yaml")).read_text()
    )
    assert logged["trainer"]["max_steps"] == MAX_STEPS
    assert logged["paths"]["run_dir"] == cfg.paths.run_dir  # resolved, not ${...}
    assert "hydra" not in logged


def test_export_is_a_registered_model_version_linked_to_the_run(tracked):
    cfg, client, run_id, _ = tracked
    (version,) = client.search_model_versions(f"name='ldm-{cfg.experiment_name}'")
    assert version.run_id == run_id
    assert version.source == f"runs:/{run_id}/export/step_{MAX_STEPS:07d}"
    assert version.tags["format"] == "diffusers" and version.tags["step"] == str(MAX_STEPS)


def test_checkpoint_paths_are_tags_and_the_run_id_is_in_the_checkpoint(tracked):
    import torch

    cfg, client, run_id, _ = tracked
    tags = client.get_run(run_id).data.tags
    last = Path(cfg.paths.run_dir) / "checkpoints" / "last.ckpt"
    assert tags["checkpoint.last"] == str(last.resolve())
    assert Path(tags["checkpoint.best"]).is_file()
    assert torch.load(last, weights_only=True)["ldm_mlflow_run_id"] == run_id


def test_export_and_final_samples_are_artifacts(tracked, tmp_path):
    cfg, client, run_id, _ = tracked
    step = f"export/step_{MAX_STEPS:07d}"
    exported = {a.path for a in client.list_artifacts(run_id, step)}
    assert f"{step}/model_index.json" in exported
    assert {f"{step}/unet", f"{step}/vae", f"{step}/text_encoder"} <= exported
    assert "samples/final.png" in {a.path for a in client.list_artifacts(run_id, "samples")}

    local = client.download_artifacts(run_id, f"{step}/model_index.json", str(tmp_path))
    logged = json.loads(Path(local).read_text())
    written = json.loads((Path(cfg.paths.run_dir) / "export" / "model_index.json").read_text())
    assert logged == written
    assert logged["_class_name"] == "StableDiffusionPipeline"


def test_resume_logs_into_the_same_run(tracked, resumed):
    cfg, client, run_id, _ = tracked
    resumed, _ = resumed
    experiment = client.get_experiment_by_name(cfg.experiment_name)
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]
    assert (Path(resumed.paths.run_dir) / RUN_ID_FILE).read_text().strip() == run_id

    loss_steps = [s for s, _ in history(client, run_id, "train/loss")]
    assert loss_steps == list(range(6))  # steps 0-3 from the first run, 4-5 from the resume
    data = client.get_run(run_id).data
    # MLflow params are immutable: they keep the first run's values, the resume goes in a tag.
    assert data.params["trainer/max_steps"] == str(MAX_STEPS)
    assert data.tags["resume_command"] == shlex.join(sys.argv)
    assert client.get_run(run_id).info.status == "FINISHED"


def test_checkpoint_uploads_policy_all_goes_through_the_spool(mlflow_server, demo_shards, tmp_path):
    """`logger.mlflow.log_model=all`: every checkpoint is uploaded as it is saved (queued: the
    step does not wait), and arrives whole."""
    import torch

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        cfg = compose_at(tmp_path, "experiment=tiny", "experiment_name=uploads",
                         f"data.urls={demo_shards}", "logger.mlflow.log_model=all",
                         f"logger.mlflow.tracking_uri={mlflow_server.uri}")  # fmt: skip
        run(cfg)
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    run_id = (Path(cfg.paths.run_dir) / RUN_ID_FILE).read_text().strip()
    uploaded = {a.path for a in client.list_artifacts(run_id)}
    assert {"step_0000002", "step_0000004", "last"} <= uploaded
    got = client.download_artifacts(run_id, "step_0000004/step_0000004.ckpt", str(tmp_path))
    assert torch.load(got, weights_only=True)["global_step"] == 4
    assert not any((Path(cfg.paths.run_dir) / "mlflow_spool").glob("artifacts/*/*"))


def test_a_resumed_run_registers_a_new_version_and_leaves_the_old_one_as_it_was(
    tracked, resumed, tmp_path_factory
):
    cfg, client, run_id, _ = tracked
    _, before = resumed
    name = f"ldm-{cfg.experiment_name}"
    versions = sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))
    assert [(str(v.version), v.source) for v in versions] == [
        ("1", f"runs:/{run_id}/export/step_{MAX_STEPS:07d}"),
        ("2", f"runs:/{run_id}/export/step_0000006"),
    ]
    assert any(k.startswith("unet/") and k.endswith(".safetensors") for k in before)
    assert version_files(client, name, "1", tmp_path_factory) == before  # bit for bit
    second = version_files(client, name, "2", tmp_path_factory)
    unet = next(k for k in before if k.startswith("unet/") and k.endswith(".safetensors"))
    assert second[unet] != before[unet]  # version 2 serves the weights trained further


def test_a_refused_resume_leaves_the_run_and_its_mlflow_record_as_they_were(tracked, resumed):
    """A resume with another batch size cannot continue the data position exactly: it is
    refused before the MLflow run is touched (status, tags, metrics) or any file is written."""
    from train.errors import ConfigError

    cfg, client, run_id, common = tracked
    before = client.get_run(run_id)
    run_dir = Path(cfg.paths.run_dir)
    files = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        cfg3 = compose_at(Path(cfg.paths.root), *common, "ckpt_path=last", "trainer.max_steps=8",
                          "data.batch_size=2")  # fmt: skip
        with pytest.raises(ConfigError, match="batch_size=4 and this run has batch_size=2"):
            run(cfg3)
    after = client.get_run(run_id)
    assert after.info.status == before.info.status == "FINISHED"
    assert after.info.end_time == before.info.end_time
    assert after.data.tags == before.data.tags  # resume_command included
    assert after.data.metrics == before.data.metrics
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()} == files
