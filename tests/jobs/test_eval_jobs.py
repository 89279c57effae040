"""`ldm-submit --eval=ARGS`: the evaluation job beside a training job, rendered for SLURM and
the three Kubernetes kinds (golden files, the real schemas), its options checked before
anything is written or submitted."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import k8s_schema
import pytest
import yaml

from jobs.submit import main, prepare, render_eval

GOLDEN = Path(__file__).parent / "golden"
BIN = str(Path(sys.executable).parent)
TRAIN = ["experiment=tiny", "data.urls='/shared/data/{00000..00009}.tar'", "batch.global_size=32",
         "launcher.job_name=golden", "paths.root=/shared/outputs", "launcher.check_paths=false"]
EVAL = ("--reference /shared/val/ref.safetensors --val-urls '/shared/val/{0..3}.tar' "
        "--clip-model openai/clip-vit-large-patch14 --num-samples 1000")  # fmt: skip
CASES = {
    "slurm_eval.sbatch": ["launcher=slurm", "launcher.nodes=2", "launcher.gpus_per_node=4",
                          "launcher.partition=gpu", "launcher.setup=[module load cuda]"],
    "indexed_job_eval.yaml": ["launcher=k8s_job", "+launcher.image=reg/ldm:0.1",
                              "launcher.nodes=2", "launcher.gpus_per_node=8"],
}  # fmt: skip


def rendered(overrides: list[str], eval_args: str = EVAL) -> str:
    launcher, job = prepare([*overrides, *TRAIN])
    return render_eval(launcher, job, eval_args).replace(BIN, "<venv>/bin")


@pytest.mark.parametrize("name", sorted(CASES))
def test_rendered_evaluation_jobs_match_golden_files(name: str) -> None:
    """Set UPDATE_GOLDEN=1 to rewrite them; review the diff like code."""
    text = rendered(CASES[name])
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text()


def test_the_slurm_evaluator_is_one_task_on_the_training_jobs_run_folder() -> None:
    text = rendered(CASES["slurm_eval.sbatch"])
    assert "#SBATCH --nodes=1\n#SBATCH --ntasks-per-node=1\n#SBATCH --gpus-per-node=1" in text
    assert "--signal" not in text and "#SBATCH --requeue" in text  # it resumes from its JSONL
    # The training run is <run_name>-<its job id> (the job name is only SLURM's).
    assert 'RUN_DIR="/shared/outputs/runs/tiny-${LDM_TRAIN_JOB_ID}"' in text
    command = text[text.index("srun ") :].replace("\\\n", " ")
    words = shlex.split(command.replace('"${RUN_DIR}"', "RUN"))
    assert words[words.index("ldm-eval") :][:3] == ["ldm-eval", "RUN", "--watch"]
    assert words[-2:] == ["--num-samples", "1000"] and "/shared/val/{0..3}.tar" in words


@pytest.mark.parametrize("kind", ["k8s", "k8s_jobset", "k8s_job"])
def test_kubernetes_evaluation_jobs_validate_against_the_real_schemas(kind: str) -> None:
    (doc,) = k8s_schema.load_yaml_documents(
        rendered([f"launcher={kind}", "+launcher.image=reg/ldm:0.1", "launcher.nodes=2",
                  "launcher.gpus_per_node=8", "launcher.mlflow_secret=creds"])  # fmt: skip
    )
    assert k8s_schema.validate_all([doc]) == []
    assert (doc["kind"], doc["metadata"]["name"]) == ("Job", "golden-eval")
    pod = doc["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"][:3] == ["ldm-eval", "/mnt/shared/outputs/runs/golden", "--watch"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["securityContext"]["runAsNonRoot"] is True
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_TRACKING_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "creds"


def test_dry_run_prints_both_jobs(capsys) -> None:
    assert main(["launcher=k8s", "+launcher.image=i", *TRAIN, f"--eval={EVAL}", "--dry-run"]) == 0
    out = capsys.readouterr().out
    training, evaluator = out.split("# ---- evaluation job (golden-eval) ----\n")
    assert yaml.safe_load(training)["kind"] == "PyTorchJob"
    assert yaml.safe_load(evaluator)["spec"]["template"]["spec"]["containers"][0]["name"] == (
        "evaluator"
    )


@pytest.mark.parametrize(
    ("launcher", "eval_args", "message"),
    [
        ("slurm", "--bogus 1", "--eval: --bogus 1: not an option of the evaluation job"),
        ("slurm", "RUN_DIR --steps 2", "--eval: RUN_DIR: not an option"),
        ("slurm", "--steps two", "--eval="),
        ("slurm", "--reference ROOT/nope.safetensors --clip-model c --val-urls v",
         "--eval: --reference: reference statistics ROOT/nope.safetensors do not exist"),
        ("slurm", "--prompts ROOT/empty.txt", "--eval: --prompts=ROOT/empty.txt: the file holds "
         "no prompt"),
        ("slurm", "--inception ROOT/none.pt", "--eval: --inception ROOT/none.pt: no such file"),
        ("local", "--steps 2", "renders no evaluation job; use launcher=slurm"),
    ],
    ids=["unknown", "positional", "type", "reference", "empty-prompts", "inception", "local"],
)  # fmt: skip
def test_bad_evaluation_options_fail_before_anything_is_written(
    launcher: str, eval_args: str, message: str, demo_shards: Path, tmp_path: Path, capsys
) -> None:
    (tmp_path / "empty.txt").write_text("\n")
    eval_args = eval_args.replace("ROOT", str(tmp_path))
    rc = main([f"launcher={launcher}", "experiment=tiny", f"data.urls={demo_shards}",
               "batch.global_size=4", f"paths.root={tmp_path}", f"--eval={eval_args}"])  # fmt: skip
    assert rc == 2
    assert message.replace("ROOT", str(tmp_path)) in capsys.readouterr().err
    assert not (tmp_path / "jobs").exists()
