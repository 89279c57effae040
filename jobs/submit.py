"""`ldm-submit`: the training config with your overrides, rendered as a job and submitted.

    ldm-submit launcher=slurm launcher.nodes=2 launcher.gpus_per_node=8 experiment=demo ...
    ldm-submit launcher=k8s launcher.image=REGISTRY/ldm:TAG --dry-run experiment=demo ...
    ldm-submit launcher=slurm ... --eval='--reference REF --clip-model CLIP --val-urls VAL'

Everything except `launcher=`/`launcher.*` is passed to `ldm-train` in the job. The whole config
is composed and checked here first, so a typo fails on the login node, not after the queue.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from hydra.errors import HydraException, InstantiationException
from hydra.utils import instantiate
from omegaconf.errors import OmegaConfBaseException

from jobs.evaluation import eval_arguments, eval_name
from jobs.launcher import Job, Launcher, SubmitError, user_overrides
from train.errors import ArgumentParser, debug_flag, report

LAUNCHERS = "launcher=slurm | k8s | k8s_jobset | k8s_job | local"


def prepare(overrides: list[str]) -> tuple[Launcher, Job]:
    """Compose and check the config, build the launcher, name the job; nothing is submitted."""
    from train.config.checks import check_config, early_checks
    from train.config.compose import compose

    cfg = compose(overrides)
    if cfg.launcher is None:
        raise SubmitError(f"choose where the job runs: {LAUNCHERS}")
    # Data and model paths are checked only where the job sees this machine's filesystem.
    check_config(cfg, local_paths=bool(cfg.launcher.get("check_paths", True)))  # launcher too
    try:
        launcher: Launcher = instantiate(cfg.launcher)
    except InstantiationException as e:  # Hydra wraps the constructor's own message
        raise (e.__cause__ if isinstance(e.__cause__, SubmitError) else e) from None
    # The global batch over the job's ranks; not the run folder: each job gets a new one.
    early_checks(cfg, launcher.world_size, local_paths=launcher.check_paths, run_dir=False)
    name, run_name = launcher.names(cfg.run_name, time.strftime("%Y%m%d-%H%M%S"))
    return launcher, Job(name, run_name, user_overrides(overrides), str(cfg.paths.root))


def check_no_secrets(text: str) -> None:
    """No value of a secret-named environment variable may end up in a job file."""
    from train.tracking.secrets import secret_values

    leaked = [v for v in secret_values() if v in text]
    if leaked:
        raise SubmitError(
            "the rendered job contains the value of a secret environment variable; pass secrets "
            "by reference (launcher.secret_env on Kubernetes, your environment on SLURM)"
        )


def write(text: str, path: Path) -> None:
    """Written under a temporary name first: a job file is never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="ldm-submit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dry-run", action="store_true", help="print the job; submit nothing")
    parser.add_argument("--out", type=Path, help="job file (default: <paths.root>/jobs/<name>.*)")
    parser.add_argument(
        "--eval", metavar="ARGS", help="also an evaluation job: `ldm-eval RUN --watch ARGS` on "
        "this run, scoring its checkpoints as they are written (ARGS: ldm-eval's options, "
        "e.g. --eval='--reference REF --clip-model CLIP --val-urls VAL')"
    )  # fmt: skip
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for ldm-train")
    args = parser.parse_intermixed_args(argv)  # flags before, between or after the overrides
    from train.errors import ConfigError

    try:
        launcher, job = prepare(args.overrides)
        text = launcher.render(job)
        eval_text = render_eval(launcher, job, args.eval) if args.eval is not None else None
        check_no_secrets(text + (eval_text or ""))
    except (SubmitError, ConfigError, HydraException, OmegaConfBaseException) as e:
        return report("ldm-submit:", str(e), debug_flag(args))  # one line, exit 2
    if args.dry_run:
        print(text, end="")
        if eval_text is not None:
            print(f"# ---- evaluation job ({eval_name(job.name)}) ----\n{eval_text}", end="")
        return 0
    path = args.out or Path(job.paths_root) / "jobs" / launcher.filename(job)
    write(text, path)
    eval_path = path.with_name(launcher.filename(Job(eval_name(job.name), job.run_name)))
    if eval_text is not None:
        write(eval_text, eval_path)
    print(f"job file: {path}", flush=True)
    try:
        submitted = launcher.submit(job, path)
        print(f"submitted: {submitted}", flush=True)
        if eval_text is not None:
            print(f"evaluation job file: {eval_path}", flush=True)
            print(f"submitted: {launcher.submit_eval(job, eval_path, submitted)}", flush=True)
    except SubmitError as e:
        print(f"ldm-submit: {e}", file=sys.stderr)
        return 1
    return 0


def render_eval(launcher: Launcher, job: Job, eval_args: str) -> str:
    """The evaluation job's file; its options checked here (files too, where the job sees this
    filesystem)."""
    return launcher.render_eval(job, eval_arguments(eval_args, launcher.check_paths))


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
