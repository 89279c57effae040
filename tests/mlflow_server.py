"""A real `mlflow server` for tests: loopback, a free port, an SQLite store and proxied artifacts
in a given folder, its own process group (the server forks workers; killing the main PID alone
leaves them serving), and `restart()` on the same port and store to simulate an outage."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

MLFLOW = str(Path(sys.executable).parent / "mlflow")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def healthy(uri: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=timeout) as r:
            return r.status == 200
    except (OSError, urllib.error.URLError):
        return False


class MlflowServer:
    """`start()` waits for `/health`; `stop()` ends the whole process group (TERM, then KILL)."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.directory = Path(directory)
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> MlflowServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # else ~10 processes, ~2 GB
        cmd = [
            MLFLOW, "server",
            "--backend-store-uri", f"sqlite:///{self.directory}/mlflow.db",
            "--artifacts-destination", str(self.directory / "artifacts"),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]  # fmt: skip
        log = open(self.directory / "server.log", "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + timeout
        while not healthy(self.uri):
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"mlflow server not healthy in {timeout:.0f} s")
            time.sleep(0.25)
        return self

    def stop(self, grace: float = 10.0) -> None:
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the leader's PID is the group id
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                self.proc.poll()  # reap the leader, else its zombie keeps the group "alive"
                if not _group_alive(pgid):
                    self.proc = None
                    return
                time.sleep(0.1)
        self.proc = None

    def kill(self) -> None:
        """A crash rather than a shutdown: SIGKILL to the group, no grace."""
        self.stop(grace=0.0)

    def restart(self, timeout: float = 90.0) -> MlflowServer:
        self.stop()
        return self.start(timeout)

    def log_tail(self, chars: int = 3000) -> str:
        path = self.directory / "server.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
