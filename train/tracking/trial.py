"""Which sweep trial this run is: the tags that make a trial's MLflow run a child of its sweep.

Apart from `train.tracking.sweep` (the Hydra callback) so that a run's tags can include these
without importing the sweep machinery, and the sweep can tag its parent with a run's tags.
"""

from __future__ import annotations

import os
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from train.tracking.secrets import redact_overrides

# The parent run's id, for the trials. Set in the launching process: in-process trials (basic
# launcher) and sbatch jobs (which export the submitting environment) inherit it; on_job_start
# sets it again in the trial's process from the pickled callback, for sites that run sbatch with
# --export=NONE.
PARENT_RUN_ENV = "LDM_SWEEP_PARENT_RUN_ID"
PARENT_TAG = "mlflow.parentRunId"
TRIAL_TAG = "sweep.trial"
OVERRIDES_TAG = "sweep.overrides"
MAX_TAG_CHARS = 5000  # MLflow caps tag values (8000 in 3.x; older servers 5000)


def sweep_tags() -> dict[str, str]:
    """Tags making this run a child of its sweep's parent run; {} outside a sweep trial.

    A trial is recognised by Hydra's job number, which only launchers set, so a plain run that
    happens to inherit the environment variable is not mistaken for one.
    """
    parent = os.environ.get(PARENT_RUN_ENV)
    if not parent or not HydraConfig.initialized():
        return {}
    hydra = HydraConfig.get()
    if OmegaConf.is_missing(hydra.job, "num"):
        return {}
    # One per line: an override's value may contain spaces.
    overrides = "\n".join(task_overrides(hydra.overrides.task))
    return {
        PARENT_TAG: parent,
        TRIAL_TAG: str(hydra.job.num),
        OVERRIDES_TAG: overrides[:MAX_TAG_CHARS],
    }


def task_overrides(overrides: Any) -> list[str]:
    """A job's command-line overrides as recorded: secret-named values hidden (`key=***`)."""
    return redact_overrides([str(o) for o in overrides])
