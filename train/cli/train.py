"""`ldm-train`: the Hydra application. `ldm-train experiment=demo trainer.max_steps=100`."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import hydra
from omegaconf import DictConfig

from train.config import resolvers as config
from train.config.compose import CONFIG_DIR, compose
from train.config.threads import set_omp_defaults
from train.errors import ConfigError, fail
from train.util import launched_rank

config.register()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _app(cfg: DictConfig) -> float | None:
    from train.cli.console import quiet_library_noise
    from train.config.checks import check_config, early_checks

    quiet_library_noise()  # the checks import the model classes, and some of them warn

    try:
        # Before the heavy imports below (cached signatures): bad configs fail in about a second.
        early_checks(cfg)
        check_config(cfg)
    except ConfigError as e:
        fail("Config error:", str(e))  # one line, exit 2; the traceback with HYDRA_FULL_ERROR=1
    from train.cli.console import tidy_console

    tidy_console()
    from train.callbacks.guards import TrainingDiverged
    from train.callbacks.preemption import Terminated
    from train.cli.run import run
    from train.distributed.checkpoint_io import CheckpointWriteError

    try:
        return run(cfg)
    except ConfigError as e:
        fail("Config error:", str(e))
    except (TrainingDiverged, CheckpointWriteError) as e:
        print(f"Training stopped: {e}", file=sys.stderr)
        sys.exit(1)
    except Terminated as e:
        print(f"Training stopped: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


def refuse_literal_secrets(args: Sequence[str]) -> None:
    """Secrets come from the environment (`key=${oc.env:NAME}`), never typed on the command line,
    where Hydra would save them in the run's .hydra/ files and shells keep them in history;
    the same for a tracking URI with credentials in it."""
    from train.tracking.secrets import literal_secret
    from train.tracking.spool import check_tracking_uri

    for arg in args:
        key, _, value = arg.partition("=")
        if key.lstrip("+~").endswith("tracking_uri"):
            try:
                check_tracking_uri(value)
            except ConfigError as e:
                print(f"Config error: {e}", file=sys.stderr)
                sys.exit(2)
        if literal_secret(arg):
            print(f"Config error: {key}=... puts a secret on the command line; export it and "
                  f"pass {key}='${{oc.env:NAME}}' instead", file=sys.stderr)  # fmt: skip
            sys.exit(2)


def check_overrides(args: Sequence[str]) -> None:
    """Hydra reports a bad override (unknown key, no such config option, bad syntax) in several
    lines and exits 1; composing here first (0.2 s) gives the one line and exit 2 of every
    script. Runs with flags (-m, --cfg, --config-dir ...) are left to Hydra."""
    if any(a.startswith("-") for a in args):
        return
    from hydra.errors import (
        ConfigCompositionException,
        MissingConfigException,
        OverrideParseException,
    )

    try:
        compose(args)
    except (ConfigCompositionException, MissingConfigException, OverrideParseException) as e:
        fail("Config error:", str(e))


def main() -> None:
    # Every process of a torchrun or srun job runs this entry point with the same overrides,
    # hence the same run directory. Only rank 0 writes the run's .hydra metadata
    # (train.config.run_files.save_hydra_files); the others log to their own file (as
    # Lightning's own launcher arranges for the processes it starts).
    set_omp_defaults()  # before torch loads: OpenMP reads how its idle threads wait then
    refuse_literal_secrets(sys.argv[1:])
    check_overrides(sys.argv[1:])
    rank = launched_rank()
    if rank > 0 and not any(a.startswith("hydra.job.name") for a in sys.argv):
        sys.argv += [f"hydra.job.name=ldm-train-rank{rank}"]
    _app()
