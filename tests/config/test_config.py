"""Config errors fail before any model is built, and name the key and the fix."""

import os

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from train.config.checks import ConfigError, check_config


def test_every_experiment_composes_and_checks(compose, tmp_path):
    vae_dir = tmp_path / "runs" / "demo-autoencoder" / "export"
    vae_dir.mkdir(parents=True)
    for experiment in ("demo", "demo_autoencoder", "tiny"):
        cfg = compose(f"experiment={experiment}")
        check_config(cfg)
        assert cfg.experiment_name.replace("_", "-") in experiment.replace("_", "-")


def test_unknown_key_is_named(compose):
    with pytest.raises(ConfigCompositionException) as err:
        compose("experiment=tiny", "trainer.max_stepz=3")
    assert "max_stepz" in str(err.value.__cause__ or err.value)


def test_unknown_constructor_argument_is_named(compose):
    cfg = compose("experiment=tiny", "+model.backbone.model.bogus_channels=3")
    match = r"model\.backbone\.model\.bogus_channels.*takes no argument"
    with pytest.raises(ConfigError, match=match):
        check_config(cfg)


@pytest.mark.parametrize(
    "override, key",
    [
        ("trainer.max_steps=abc", "trainer.max_steps"),
        ("model.caption_dropout=high", "model.caption_dropout"),
        ("data.batch_size=1.5", "data.batch_size"),
        ("model.backbone.model.layers_per_block=[a,b]", "model.backbone.model.layers_per_block"),
    ],
)
def test_wrong_type_is_named(compose, override, key):
    cfg = compose("experiment=tiny", override)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check_config(cfg)


def test_wrong_type_of_root_key_fails_at_composition(compose):
    with pytest.raises(ConfigCompositionException) as err:
        compose("experiment=tiny", "seed=abc")
    cause = err.value.__cause__
    assert isinstance(cause, ValidationError) and "seed" in str(cause)


def test_missing_required_value_is_named(compose):
    cfg = compose("experiment=tiny", "model/backbone=unet_pretrained")
    with pytest.raises(
        ConfigError, match=r"model\.backbone\.model\.pretrained_model_name_or_path is required"
    ):
        check_config(cfg)


def test_missing_local_model_folder_is_named(compose, tmp_path):
    cfg = compose("experiment=demo")  # stage 2 before stage 1 wrote the VAE
    with pytest.raises(
        ConfigError, match=r"model\.vae\.pretrained_model_name_or_path.*demo_autoencoder"
    ):
        check_config(cfg)


def test_a_cached_check_imports_no_model_code(tmp_path, demo_shards):
    """Once the targets' signatures are cached, checking a config (and finding its error)
    imports neither torch, Lightning nor diffusers: bad configs fail in about a second."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from train.config.compose import compose\n"
        "from train.config.checks import ConfigError, check_config, early_checks\n"
        f"cfg = compose(['experiment=tiny', 'data.urls={demo_shards}', 'trainer.max_steps=abc'])\n"
        "early_checks(cfg)\n"
        "try:\n    check_config(cfg)\nexcept ConfigError as e:\n    print(e)\n"
        "print(sorted(m for m in ('torch', 'lightning', 'diffusers') if m in sys.modules))\n"
    )
    env = {**os.environ, "LDM_CACHE_DIR": str(tmp_path / "cache")}
    runs = [subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                           text=True, timeout=120, check=True) for _ in range(2)]  # fmt: skip
    expected = "trainer.max_steps='abc' has type str, but lightning.Trainer expects int"
    assert all(expected in r.stdout for r in runs)
    assert runs[0].stdout.splitlines()[-1] == "['diffusers', 'lightning', 'torch']"  # cold cache
    assert runs[1].stdout.splitlines()[-1] == "[]"
    assert (tmp_path / "cache" / "signatures.json").is_file()
