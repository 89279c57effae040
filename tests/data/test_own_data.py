"""Training on your own shards: `experiment=shards` is named after the run and previews your
captions (not the demo's shapes), `data=shards` keeps the experiment's batch size, and the
loader's worker count follows the CPUs this process may use."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hydra.utils import instantiate
from PIL import Image

from data.shards import jpeg_bytes, write_shards
from train.config import resolvers as config
from train.config.checks import check_config

CAPTIONS = [f"a photo of my dog number {i}" for i in range(8)]


@pytest.fixture(scope="module")
def own_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two shards of 4 captioned photos each: not shapes."""
    out = tmp_path_factory.mktemp("own")
    samples = [
        {"__key__": f"{i:09d}", "jpg": jpeg_bytes(Image.new("RGB", (16, 16), (30 * i, 9, 9))),
         "txt": caption.encode()}
        for i, caption in enumerate(CAPTIONS)
    ]  # fmt: skip
    write_shards(samples, str(out / "own-%06d.tar"), maxcount=4)
    return out


def own(compose, shards: Path, *overrides: str) -> Any:
    return compose("experiment=shards", f'data.urls="{shards}/own-{{000000..000001}}.tar"',
                   "model.vae.pretrained_model_name_or_path=VAE", *overrides)  # fmt: skip


def preview_prompts(cfg: Any, tokenizer: Any) -> list[str]:
    """The prompts the run's SamplePreview would draw its first preview for, from its first
    training batch (what LatentDiffusion.preview does with them)."""
    samples = instantiate(cfg.callbacks.samples)
    dm = instantiate(cfg.data, tokenizer=tokenizer)
    batch = next(iter(dm.train_dataloader()))
    samples.on_train_batch_start(None, None, batch, 0)
    return samples.prompts or list(samples._batch["caption"])[:8]


def test_own_data_preset_is_named_after_the_run_and_previews_its_captions(
    compose, own_shards: Path, tokenizer: Any
) -> None:
    cfg = own(compose, own_shards, "experiment_name=my-ldm", "data.resolution=16",
              "data.num_workers=0", "data.shuffle_buffer=0", "data.batch_size=4")  # fmt: skip
    assert cfg.experiment_name == "my-ldm" and cfg.run_name == "my-ldm"
    assert cfg.paths.run_dir.endswith("/runs/my-ldm")
    assert cfg.callbacks.export.register_as == "ldm-my-ldm"
    check_config(cfg, local_paths=False)  # VAE is the user's folder, not this machine's
    prompts = preview_prompts(cfg, tokenizer)
    assert prompts and set(prompts) <= set(CAPTIONS)
    # ldm-submit gives each SLURM job the run name <name>-<job id>: the experiment stays one.
    assert (
        own(compose, own_shards, "experiment_name=my-ldm", "run_name=my-ldm-42").experiment_name
        == "my-ldm"
    )


def test_own_data_stage_1_is_named_after_the_run_too(compose, own_shards: Path) -> None:
    cfg = compose("experiment=shards_autoencoder", f"data.urls={own_shards}",
                  "experiment_name=my-vae")  # fmt: skip
    assert cfg.model._target_ == "train.tasks.autoencoder.AutoencoderTraining"
    assert cfg.paths.run_dir.endswith("/runs/my-vae")  # stage 2 reads runs/my-vae/export
    assert cfg.callbacks.export.register_as == "ldm-my-vae"  # not ldm-demo-autoencoder
    assert cfg.data.batch_size == 16
    check_config(cfg)


def test_own_data_previews_can_come_from_a_prompt_file(
    compose, own_shards: Path, tmp_path: Path
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# previews\na dog on a beach\n\na dog in the snow\n")
    cfg = own(compose, own_shards, "experiment_name=x",
              f"callbacks.samples.prompts=${{prompt_file:{prompts}}}")  # fmt: skip
    assert instantiate(cfg.callbacks.samples).prompts == ["a dog on a beach", "a dog in the snow"]
    prompts.write_text("# only a comment\n")
    with pytest.raises(Exception, match="holds no prompts"):
        instantiate(cfg.callbacks.samples)


def test_the_experiment_owns_the_batch_size_whatever_the_data(compose, own_shards: Path) -> None:
    urls = f"data.urls={own_shards}"
    assert compose("experiment=demo").data.batch_size == 32
    assert compose("experiment=demo", "data=shards", urls).data.batch_size == 32
    assert compose("experiment=demo_autoencoder", "data=shards", urls).data.batch_size == 16
    assert compose("experiment=tiny", "data=shards", urls).data.batch_size == 4


def test_shard_workers_follow_the_cpus_this_process_may_use(
    compose, own_shards: Path, tmp_path: Path, monkeypatch
) -> None:
    cfg = compose("experiment=demo", "data=shards", f"data.urls={own_shards}")
    assert cfg.data.num_workers == min(4, config.available_cpus())
    monkeypatch.setattr(config.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert cfg.data.num_workers == 2  # resolved when read: on the machine that trains
    (tmp_path / "cpu.max").write_text("100000 100000\n")  # a one-CPU container on that host
    assert config.available_cpus(str(tmp_path)) == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert config.available_cpus(str(tmp_path)) == 2
    set_by_user = compose("experiment=demo", "data=shards", f"data.urls={own_shards}",
                          "data.num_workers=3")  # fmt: skip
    assert set_by_user.data.num_workers == 3
