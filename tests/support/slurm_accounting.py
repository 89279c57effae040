"""Job accounting for the local SLURM cluster: slurmdbd on a private MariaDB server.

`sacct` needs slurmdbd; submitit (hydra-submitit-launcher) polls it. The database server
listens only on a unix socket in the cluster's folder and keeps its data there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from support.slurm_local import LocalSlurm

MYSQL_SOCKET = "mysql.sock"
DATABASE = "slurm_acct_db"
CLUSTER = "local"

# For accounting_storage/slurmdbd, AccountingStoragePass names the munge socket that clients
# and slurmctld use towards slurmdbd; AuthInfo's socket= is not used for that connection.
ACCOUNTING_LINES = """\
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort={dbd_port}
AccountingStoragePass={munge_socket}"""

# slurmdbd has no option for its config file: it reads slurmdbd.conf from the folder of
# $SLURM_CONF, and refuses it unless it is mode 600 and owned by SlurmUser.
# StorageHost=localhost makes MariaDB's client library use a unix socket (StoragePort is then
# unused). slurmdbd 22.05 has no setting for the socket's path and reads no my.cnf (a
# $MARIADB_HOME/my.cnf was ignored), but libmariadb takes $MYSQL_UNIX_PORT, which up() sets
# to DIR/mysql.sock in slurmdbd's environment.
SLURMDBD_CONF = """\
DbdHost=localhost
DbdPort={dbd_port}
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket}
PidFile={dir}/slurmdbd.pid
LogFile={dir}/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc={database}
"""


def which(*names: str) -> str | None:
    """The first of ``names`` on PATH (MariaDB renamed its programs; both names exist)."""
    return next((path for name in names if (path := shutil.which(name))), None)


def wait_for(ready: Callable[[], bool], deadline: float, what: str, d: Path) -> None:
    while not ready():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not come up in time; see {d}/*.log")
        time.sleep(0.3)


def write_slurmdbd_conf(d: Path, dbd_port: int, munge_socket: Path) -> None:
    """slurmdbd.conf in ``d``, mode 600 (slurmdbd refuses it otherwise)."""
    dbd_conf = SLURMDBD_CONF.format(
        dbd_port=dbd_port, munge_socket=munge_socket, dir=d, database=DATABASE
    )
    fd = os.open(d / "slurmdbd.conf", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(dbd_conf)
    os.chmod(d / "slurmdbd.conf", 0o600)  # an older file keeps its mode otherwise


def start_mariadb(d: Path, deadline: float) -> None:
    """A private MariaDB server on a unix socket in ``d`` (no TCP), with the database."""
    datadir, sock, marker = d / "mysql", d / MYSQL_SOCKET, d / "mysql.initialised"
    # --no-defaults everywhere: /etc/mysql names the system server's socket, pid and datadir.
    if not marker.exists():  # a datadir without the marker is a half-done first try
        shutil.rmtree(datadir, ignore_errors=True)
        subprocess.run(
            [which("mariadb-install-db", "mysql_install_db") or "mariadb-install-db",
             "--no-defaults", f"--datadir={datadir}", "--user=root",
             "--auth-root-authentication-method=socket", "--skip-test-db"],
            check=True, capture_output=True,
        )  # fmt: skip
        marker.touch()
    # mariadbd does not daemonize: its own session keeps it out of the caller's Ctrl-C.
    # slurmdbd logs that innodb_buffer_pool_size and innodb_lock_wait_timeout are below what it
    # recommends; that matters for big clusters' databases, not for this one.
    server = subprocess.Popen(
        [which("mariadbd", "mysqld") or "mariadbd", "--no-defaults", f"--datadir={datadir}",
         f"--socket={sock}", f"--pid-file={d / 'mariadb.pid'}", "--skip-networking",
         f"--log-error={d / 'mariadb.log'}", "--user=root"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    # root@localhost authenticates by the socket's peer (unix_socket), so no password.
    create = [which("mariadb", "mysql") or "mariadb", "--no-defaults", f"--socket={sock}",
              "--user=root", "-e", f"CREATE DATABASE IF NOT EXISTS {DATABASE}"]  # fmt: skip

    def ready() -> bool:
        if server.poll() is not None:
            raise RuntimeError(f"MariaDB exited with {server.returncode}; see {d}/mariadb.log")
        return subprocess.run(create, capture_output=True).returncode == 0

    wait_for(ready, deadline, "MariaDB", d)


def start_slurmdbd(cluster: LocalSlurm, deadline: float) -> None:
    """slurmdbd on the private MariaDB, and this cluster registered with it."""
    d = cluster.dir
    env = {**cluster.env, "MYSQL_UNIX_PORT": str(d / MYSQL_SOCKET)}
    subprocess.run(["slurmdbd"], check=True, env=env)  # forks; ready once sacctmgr answers
    listing = ("sacctmgr", "-n", "-P", "list", "cluster", "format=Cluster")

    def answers() -> bool:
        return cluster.run(*listing, check=False).returncode == 0

    wait_for(answers, deadline, "slurmdbd", d)
    # Without the cluster in the database slurmctld's jobs are not recorded.
    if CLUSTER not in cluster.run(*listing).stdout.split():
        cluster.run("sacctmgr", "-i", "add", "cluster", CLUSTER)
