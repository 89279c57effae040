"""A one-node SLURM cluster on this machine, for trying the SLURM path and for the tests.

    PYTHONPATH=tests python -m support.slurm_local up DIR      # install (Debian/Ubuntu, root),
    configure, start
    SLURM_CONF=DIR/slurm.conf sbatch ...   # submit as on a real cluster
    SLURM_CONF=DIR/slurm.conf sacct -j ID  # how a job ended, also after it left the queue
    PYTHONPATH=tests python -m support.slurm_local down DIR    # stop the daemons by the PIDs they
    wrote

Debian's slurm-wlm with munge, run as root without systemd or cgroups (linuxproc process
tracking). By default jobs are recorded by slurmdbd in a private MariaDB server that listens
only on a unix socket in DIR, so `sacct` works: submitit (and so hydra-submitit-launcher)
polls it, and without it waits forever for a job that died hard. `up DIR --no-accounting`
skips slurmdbd and MariaDB (quicker start, but `sacct` fails).

Configuration, state, the database, logs and PID files all live under DIR; nothing in /etc is
changed except what the packages install. Daemons are stopped by PID, never by name.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from support.slurm_accounting import (
    ACCOUNTING_LINES,
    CLUSTER,
    start_mariadb,
    start_slurmdbd,
    wait_for,
    which,
    write_slurmdbd_conf,
)

PACKAGES = ["munge", "slurmctld", "slurmd", "slurm-client"]
ACCOUNTING_PACKAGES = ["slurmdbd", "mariadb-server"]
MUNGE_SOCKET = "munge.socket"
# Daemons in the order down() stops them (compute node first, munge last: the others need it
# to say goodbye), with the process name that /proc/PID/comm must show.
DAEMONS = {
    "slurmd": ("slurmd",),
    "slurmctld": ("slurmctld",),
    "slurmdbd": ("slurmdbd",),
    "mariadb": ("mariadbd", "mysqld"),
    "munged": ("munged",),
}
# Job states after which a job will still change (sacct reports the same names).
ACTIVE_STATES = ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING", "REQUEUED", "SUSPENDED")

SLURM_CONF = """\
ClusterName={cluster}
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
{accounting}
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

    @property
    def accounting(self) -> bool:
        """Whether jobs are recorded by slurmdbd (so `sacct` works)."""
        return "accounting_storage/slurmdbd" in self.conf.read_text()

    def run(
        self, *cmd: str, env: dict[str, str] | None = None, check: bool = True
    ) -> subprocess.CompletedProcess:
        """A SLURM client command against this cluster; ``env`` replaces this process's
        environment (sbatch passes it on to the job)."""
        full = {**(env if env is not None else os.environ), "SLURM_CONF": str(self.conf)}
        # In the cluster's folder: a job starts where sbatch ran, and SLURM's own
        # slurm-<id>.out files land there, not in the caller's working directory.
        return subprocess.run(
            cmd, env=full, cwd=self.dir, capture_output=True, text=True, check=check
        )

    def job_state(self, job_id: str) -> str:
        """The job's state as slurmctld knows it ("UNKNOWN" once it forgot the job)."""
        out = self.run("scontrol", "show", "job", job_id, check=False).stdout
        for field in out.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return "UNKNOWN"

    def sacct_state(self, job_id: str) -> str:
        """The job's state in the accounting database ("UNKNOWN" until slurmdbd has it).

        sacct may say "CANCELLED by 0": only the state's name is returned."""
        proc = self.run("sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State", check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"sacct failed: {proc.stderr.strip()}")
        lines = proc.stdout.split()
        return lines[0] if lines else "UNKNOWN"

    def final_sacct_state(self, job_id: str, timeout: float = 60) -> str:
        """The job's state in the accounting database once it stops changing: slurmdbd hears
        of the job's end a moment after slurmctld, and until then reports RUNNING or nothing."""
        deadline = time.monotonic() + timeout
        state = self.sacct_state(job_id)
        while (state == "UNKNOWN" or state in ACTIVE_STATES) and time.monotonic() < deadline:
            time.sleep(1)
            state = self.sacct_state(job_id)
        return state

    def wait(self, job_id: str, timeout: float = 600) -> str:
        """Block until the job leaves PENDING/RUNNING/COMPLETING; return its final state."""
        deadline = time.monotonic() + timeout
        state = "UNKNOWN"
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            # slurmctld forgets a job MinJobAge after it ended; the database does not.
            if state == "UNKNOWN" and self.accounting:
                state = self.sacct_state(job_id)
            if state not in ACTIVE_STATES:
                return state
            time.sleep(1)
        raise TimeoutError(f"SLURM job {job_id} still {state} after {timeout} s")


def install(accounting: bool = True) -> None:
    """Install munge and SLURM, and slurmdbd and MariaDB for accounting, with apt where they
    are missing (needs root)."""
    found = [which(b) for b in ("munged", "slurmctld", "slurmd", "sbatch")]
    packages = list(PACKAGES)
    if accounting:
        found += [which("slurmdbd"), which("mariadbd", "mysqld")]
        found += [which("mariadb-install-db", "mysql_install_db"), which("mariadb", "mysql")]
        packages += ACCOUNTING_PACKAGES
    if all(found):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise RuntimeError(
            "SLURM and munge are not installed and cannot be installed here (needs root and "
            f"apt-get): install {' '.join(packages)} first"
        )
    # Debian's policy-rc.d (containers) or the missing systemd keeps apt from starting the
    # system's own MariaDB and slurmdbd; up() starts private ones.
    cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages]
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


def _write_configs(d: Path, dbd_port: int | None) -> None:
    """slurm.conf, and for accounting slurmdbd.conf, in ``d``."""
    host = socket.gethostname().split(".")[0]
    munge_socket = d / "munge" / MUNGE_SOCKET
    accounting = "AccountingStorageType=accounting_storage/none"
    if dbd_port is not None:
        accounting = ACCOUNTING_LINES.format(dbd_port=dbd_port, munge_socket=munge_socket)
        write_slurmdbd_conf(d, dbd_port, munge_socket)
    (d / "slurm.conf").write_text(
        SLURM_CONF.format(
            cluster=CLUSTER,
            host=host,
            dir=d,
            ctld_port=_free_port(),
            slurmd_port=_free_port(),
            munge_socket=munge_socket,
            accounting=accounting,
            node_line=_node_line(host),
        )
    )


def _start_munged(d: Path) -> None:
    munge_socket = d / "munge" / MUNGE_SOCKET
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


def up(directory: str | Path, accounting: bool = True, timeout: float = 120) -> LocalSlurm:
    """Install if needed, write the config under ``directory``, start munged, (with
    ``accounting``) MariaDB and slurmdbd, slurmctld and slurmd, and wait until the node accepts
    jobs. A failed start stops what it started."""
    install(accounting)
    d = Path(directory).resolve()
    for sub in ("state", "spool", "munge"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    cluster = LocalSlurm(d)
    try:
        _write_configs(d, _free_port() if accounting else None)
        _start_munged(d)
        if accounting:
            start_mariadb(d, deadline)
            start_slurmdbd(cluster, deadline)
        subprocess.run(["slurmctld", "-f", str(cluster.conf)], check=True, env=cluster.env)
        subprocess.run(["slurmd", "-f", str(cluster.conf)], check=True, env=cluster.env)

        def node_ready() -> bool:
            state = cluster.run("sinfo", "-h", "-o", "%t", check=False).stdout.strip()
            return state in ("idle", "mix", "alloc")

        wait_for(node_ready, deadline, "the local SLURM node", d)
    except BaseException:
        down(d)
        raise
    return cluster


def down(directory: str | Path) -> None:
    """Cancel jobs, then stop slurmd, slurmctld, slurmdbd, MariaDB and munged by the PIDs
    they wrote."""
    d = Path(directory).resolve()
    cluster = LocalSlurm(d)
    if cluster.conf.exists() and shutil.which("scancel"):
        # Killing slurmd leaves running steps alive: let slurmctld end the jobs first.
        cluster.run("scancel", "--user=root", check=False)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            squeue = cluster.run("squeue", "-h", "-o", "%i", check=False)
            if squeue.returncode != 0 or not squeue.stdout.strip():
                break
            time.sleep(0.5)
    for name, comms in DAEMONS.items():
        pid_file = d / f"{name}.pid"
        if not pid_file.exists():
            continue
        _stop(int(pid_file.read_text().split()[0]), comms)
        pid_file.unlink(missing_ok=True)


def _alive(pid: int, comms: tuple[str, ...]) -> bool:
    """Whether ``pid`` is a live process named one of ``comms``: a stale PID file may name a
    process that reused the number. A zombie is gone once its last thread is: a daemon whose
    main thread returned shows as a zombie while its other threads still shut down."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return False
    status = dict(line.split(":", 1) for line in lines if ":" in line)
    if status["State"].split()[0] == "Z" and int(status["Threads"]) <= 1:
        with contextlib.suppress(ChildProcessError):  # ours (mariadbd): reap it
            os.waitpid(pid, os.WNOHANG)
        return False
    return status["Name"].strip() in comms


def _stop(pid: int, comms: tuple[str, ...], timeout: float = 10) -> None:
    if not _alive(pid, comms):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid, comms):
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="PYTHONPATH=tests python -m support.slurm_local",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("dir", help="folder for config, state, database, logs and PID files")
    parser.add_argument(
        "--no-accounting",
        action="store_true",
        help="up: no slurmdbd/MariaDB (quicker; sacct then fails)",
    )
    args = parser.parse_args(argv)
    if args.action == "up":
        cluster = up(args.dir, accounting=not args.no_accounting)
        print(f"SLURM is up. Point clients at it with:\n  export SLURM_CONF={cluster.conf}")
    else:
        down(args.dir)
        print(f"stopped the daemons of {args.dir}")


if __name__ == "__main__":
    main()
