"""The local SLURM cluster with job accounting: `sacct` reports how each job ended (what
submitit polls), and a batch job's output lands where `--output` says."""

from __future__ import annotations

from pathlib import Path

from support.slurm_local import LocalSlurm


def _submit(cluster: LocalSlurm, out_dir: Path, command: str) -> str:
    out = cluster.run(
        "sbatch", "--parsable", f"--chdir={out_dir}", f"--output={out_dir}/%j.out",
        "--wrap", command,
    ).stdout  # fmt: skip
    return out.strip().split(";")[0]  # "ID" or "ID;cluster"


def test_sacct_reports_completed_job_and_its_output(slurm: LocalSlurm, tmp_path: Path) -> None:
    job = _submit(slurm, tmp_path, "echo hi")
    assert slurm.final_sacct_state(job) == "COMPLETED"
    assert slurm.wait(job, timeout=60) == "COMPLETED"
    assert (tmp_path / f"{job}.out").read_text().strip() == "hi"


def test_sacct_reports_failed_job_with_its_exit_code(slurm: LocalSlurm, tmp_path: Path) -> None:
    job = _submit(slurm, tmp_path, "exit 3")
    assert slurm.final_sacct_state(job) == "FAILED"
    exit_code = slurm.run("sacct", "-j", job, "-X", "-n", "-P", "-o", "ExitCode").stdout
    assert exit_code.strip() == "3:0"
