"""A one-node SLURM cluster on this machine, for trying the SLURM path and for the tests.

    python -m jobs.slurm_local up DIR      # install (Debian/Ubuntu, root), configure, start
    SLURM_CONF=DIR/slurm.conf sbatch ...   # submit as on a real cluster
    python -m jobs.slurm_local down DIR    # stop the daemons by the PIDs they wrote

Debian's slurm-wlm with munge, run as root without systemd or cgroups (linuxproc process
tracking). Configuration, state, logs and PID files all live under DIR; nothing in /etc is
changed except what the packages install. Daemons are stopped by PID, never by name.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ["munge", "slurmctld", "slurmd", "slurm-client"]
MUNGE_SOCKET = "munge.socket"

SLURM_CONF = """\
ClusterName=local
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire=10
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=1024
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=2
JobRequeue=1
KillWait=5
MinJobAge=300
ReturnToService=2
{node_line}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class LocalSlurm:
    """A running cluster: its folder and the environment that points clients at it."""

    dir: Path

    @property
    def conf(self) -> Path:
        return self.dir / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(
        self, *cmd: str, env: dict[str, str] | None = None, check: bool = True
    ) -> subprocess.CompletedProcess:
        """A SLURM client command against this cluster; ``env`` replaces this process's
        environment (sbatch passes it on to the job)."""
        full = {**(env if env is not None else os.environ), "SLURM_CONF": str(self.conf)}
        return subprocess.run(cmd, env=full, capture_output=True, text=True, check=check)

    def job_state(self, job_id: str) -> str:
        out = self.run("scontrol", "show", "job", job_id, check=False).stdout
        for field in out.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return "UNKNOWN"

    def wait(self, job_id: str, timeout: float = 600) -> str:
        """Block until the job leaves PENDING/RUNNING/COMPLETING; return its final state."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state not in ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING", "REQUEUED"):
                return state
            time.sleep(1)
        raise TimeoutError(f"SLURM job {job_id} still {self.job_state(job_id)} after {timeout} s")


def install() -> None:
    """Install munge and SLURM with apt where they are missing (needs root)."""
    if all(shutil.which(b) for b in ("munged", "slurmctld", "slurmd", "sbatch")):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise RuntimeError(
            "SLURM and munge are not installed and cannot be installed here (needs root and "
            f"apt-get): install {' '.join(PACKAGES)} first"
        )
    cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]
    if subprocess.run(cmd, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True)
        subprocess.run(cmd, check=True, capture_output=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_line(host: str) -> str:
    """This machine's node definition as `slurmd -C` reports it, less 1 GiB for the OS."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    fields = dict(f.split("=", 1) for f in out.splitlines()[0].split())
    keep = ["CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore"]
    memory = max(int(fields["RealMemory"]) - 1024, 1024)
    layout = " ".join(f"{k}={fields[k]}" for k in keep if k in fields)
    return f"NodeName={host} NodeAddr=127.0.0.1 {layout} RealMemory={memory} State=UNKNOWN"


def up(directory: str | Path, timeout: float = 60) -> LocalSlurm:
    """Install if needed, write the config under ``directory``, start munged, slurmctld and
    slurmd, and wait until the node accepts jobs."""
    install()
    d = Path(directory).resolve()
    for sub in ("state", "spool", "munge"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    host = socket.gethostname().split(".")[0]
    munge_socket = d / "munge" / MUNGE_SOCKET
    (d / "slurm.conf").write_text(
        SLURM_CONF.format(
            host=host,
            dir=d,
            ctld_port=_free_port(),
            slurmd_port=_free_port(),
            munge_socket=munge_socket,
            node_line=_node_line(host),
        )
    )
    key = d / "munge" / "munge.key"
    if not key.exists():
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
    subprocess.run(
        ["munged", "--force", f"--socket={munge_socket}", f"--key-file={key}",
         f"--pid-file={d / 'munged.pid'}", f"--log-file={d / 'munged.log'}",
         f"--seed-file={d / 'munge' / 'munged.seed'}"],
        check=True, capture_output=True,
    )  # fmt: skip
    cluster = LocalSlurm(d)
    subprocess.run(["slurmctld", "-f", str(cluster.conf)], check=True, env=cluster.env)
    subprocess.run(["slurmd", "-f", str(cluster.conf)], check=True, env=cluster.env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = cluster.run("sinfo", "-h", "-o", "%t", check=False).stdout.strip()
        if state in ("idle", "mix", "alloc"):
            return cluster
        time.sleep(0.3)
    down(d)
    raise RuntimeError(f"the local SLURM node did not come up in {timeout} s; see {d}/*.log")


def down(directory: str | Path) -> None:
    """Cancel jobs, then stop slurmd, slurmctld and munged by the PIDs they wrote."""
    d = Path(directory).resolve()
    cluster = LocalSlurm(d)
    if cluster.conf.exists() and shutil.which("scancel"):
        cluster.run("scancel", "--user=root", check=False)
    for name in ("slurmd", "slurmctld", "munged"):
        pid_file = d / f"{name}.pid"
        if not pid_file.exists():
            continue
        pid = int(pid_file.read_text().split()[0])
        _stop(pid)
        pid_file.unlink(missing_ok=True)


def _stop(pid: int, timeout: float = 10) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jobs.slurm_local", description=__doc__)
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("dir", help="folder for config, state, logs and PID files")
    args = parser.parse_args(argv)
    if args.action == "up":
        cluster = up(args.dir)
        print(f"SLURM is up. Point clients at it with:\n  export SLURM_CONF={cluster.conf}")
    else:
        down(args.dir)
        print(f"stopped the daemons of {args.dir}")


if __name__ == "__main__":
    main()
