"""The background thread that sends an MLflow spool in order, riding out tracker outages."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from pathlib import Path

from train.tracking.spool import BATCH_LIMITS, Op, Sender, Spool, Unreachable, probe

log = logging.getLogger("train.tracking.logger")


class SendWorker:
    """Sends spooled writes in order from a daemon thread; `flush` waits for them."""

    def __init__(self, spool: Spool, uri: str, probe_timeout_s: float, down: str | None) -> None:
        self.spool, self.uri, self.probe_timeout_s = spool, uri, probe_timeout_s
        self.queue: deque[Op] = deque(spool.pending())  # a previous process's leftovers first
        self.cond = threading.Condition()
        self.wake = threading.Event()  # cuts a backoff short while someone waits in flush()
        self.down_since: float | None = time.monotonic() if down else None
        self.thread = threading.Thread(target=self._loop, name="mlflow-sender", daemon=True)

    def submit(self, op: Op, source: Path | None = None) -> None:
        op = self.spool.append(op, source)
        with self.cond:
            self.queue.append(op)
            self.cond.notify_all()

    def flush(self, timeout: float) -> int:
        """Wait up to `timeout` s for the queue to drain; returns how many writes are left."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.queue and (left := deadline - time.monotonic()) > 0:
                self.wake.set()
                self.cond.wait(min(left, 0.5))
            return len(self.queue)

    def _loop(self) -> None:
        sender = Sender(self.spool, self.uri)
        while True:
            if self.down_since is not None:
                self._wait_until_up()
            with self.cond:
                while not self.queue:
                    self.cond.wait()
                ops = list(itertools.islice(self.queue, BATCH_LIMITS["metrics"]))
            try:
                done = sender.send(ops)
            except Unreachable as e:
                self._went_down(str(e))
                continue
            except Exception:  # a bug here must not end tracking for the rest of the run
                log.exception("MLflow sender failed; retrying")
                time.sleep(5.0)
                continue
            with self.cond:
                for _ in range(done):
                    self.queue.popleft()
                self.cond.notify_all()

    def _went_down(self, reason: str) -> None:
        self.down_since = time.monotonic()
        log.warning(
            f"MLflow tracking server {self.uri} stopped answering ({reason[:300]}). Training "
            f"goes on; {len(self.queue)} writes are kept in {self.spool.dir} and sent when it "
            "is back"
        )

    def _wait_until_up(self) -> None:
        delay = 1.0
        while probe(self.uri, self.probe_timeout_s) is not None:
            self.wake.wait(delay)
            delay = 1.0 if self.wake.is_set() else min(delay * 2, 15.0)
            self.wake.clear()
        gone = time.monotonic() - (self.down_since or time.monotonic())
        log.warning(
            f"MLflow tracking server {self.uri} answers again (away {gone:.0f} s); sending "
            f"{len(self.queue)} buffered writes"
        )
        self.down_since = None
