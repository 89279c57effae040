"""The evaluation job `ldm-submit --eval=ARGS` renders beside a training job.

One process, `ldm-eval RUN_DIR --watch ARGS`, on the filesystem the training job writes: it
scores each checkpoint as it appears and logs to the training's MLflow run, so the training
devices never wait for evaluation (train/cli/eval_watch.py). SLURM starts it once the training
job has started (`--dependency=after:<id>`, the run folder carries that id); on Kubernetes it is
a plain Job beside the training objects, in the same file. A requeued or restarted evaluator
skips what it has already scored.
"""

from __future__ import annotations

import argparse
import shlex

from jobs.launcher import SubmitError
from train.evaluation.options import add_evaluation_args, check_inputs

EVAL_COMMAND = "ldm-eval"
TRAIN_JOB_ENV = "LDM_TRAIN_JOB_ID"  # SLURM: the training job whose run the evaluator watches


def eval_arguments(text: str, check_paths: bool) -> list[str]:
    """The `ldm-eval` options of `--eval=TEXT`, parsed and (with `check_paths`: the job sees
    this filesystem) their files checked; SubmitError / ConfigError name what is wrong."""
    parser = argparse.ArgumentParser(prog="ldm-submit --eval", add_help=False,
                                     exit_on_error=False)  # fmt: skip
    add_evaluation_args(parser)
    try:
        args = shlex.split(text)
        parsed, extra = parser.parse_known_args(args)
    except (ValueError, argparse.ArgumentError) as e:
        raise SubmitError(f"--eval={text!r}: {e}") from None
    if extra:
        raise SubmitError(
            f"--eval: {' '.join(extra)}: not an option of the evaluation job (it takes ldm-eval's "
            "options, e.g. --reference R --clip-model M --val-urls S; the run folder and --watch "
            "are the job's own)"
        )
    if check_paths:
        check_inputs(parsed, "--eval:")
    return args


def eval_command(run_dir: str, args: list[str]) -> list[str]:
    return [EVAL_COMMAND, run_dir, "--watch", *args]


def eval_name(job_name: str) -> str:
    return f"{job_name}-eval"
