"""`ResilientMLFlowLogger`: Lightning's MLFlowLogger that a tracker outage cannot kill or stall.

With a tracking server (http/https URI) every write (metrics, params, tags, artifacts, the final
status) is appended to a durable spool under the run folder and sent by a background thread, so
a training step never waits on the network. When the server stops answering, the thread keeps
the writes, warns once, probes `/health` with backoff and sends them, in order, once it answers
again (warning once more). `finalize` waits up to `flush_timeout_s`; whatever is still unsent
stays in the spool and the log names the command that sends it (`python -m train.cli.mlflow_sync`).

Server down at start: the run is spooled under a provisional id (`offline-<hex>`) rather than
redirected to a local SQLite store, because (1) a server that comes back mid-run then gets the
whole run by itself, no manual step; (2) outages at start and mid-run take one code path, and
the sync CLI replays with that same code; (3) the provisional id maps to the server's id in the
spool, so a resume with either id (run folder or checkpoint) logs into the same server run.

Local stores (sqlite:, file:) cannot go away; they are written synchronously, as by
MLFlowLogger, unless `buffered=True`.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from train.tracking.spool import (
    PROVISIONAL_PREFIX,
    Op,
    Spool,
    check_tracking_uri,
    is_http,
    is_permanent,
    probe,
)
from train.tracking.worker import SendWorker

log = logging.getLogger(__name__)
_STATUS = {"success": "FINISHED", "finished": "FINISHED", "failed": "FAILED"}


def _now_ms() -> int:
    return int(time.time() * 1000)


class _ClientProxy:
    """What `logger.experiment` returns for a server: an MlflowClient whose writes are queued
    (they never block and never raise for the tracker) and whose other calls wait for the queue
    to drain (read-after-write), then go to the server, or fail fast while it is away."""

    def __init__(self, logger: ResilientMLFlowLogger, client: Any) -> None:
        self._logger, self._client = logger, client

    def log_batch(self, run_id: str, metrics=(), params=(), tags=(), **_: Any) -> None:
        self._submit({
            "kind": "batch", "run": run_id,
            "metrics": [[m.key, float(m.value), int(m.timestamp), int(m.step or 0)]
                        for m in metrics],
            "params": [[p.key, str(p.value)] for p in params],
            "tags": [[t.key, str(t.value)] for t in tags],
        })  # fmt: skip

    def log_metric(self, run_id: str, key: str, value: float, timestamp: int | None = None,
                   step: int | None = None, **_: Any) -> None:  # fmt: skip
        metric = [key, float(value), timestamp or _now_ms(), step or 0]
        self._submit({"kind": "batch", "run": run_id, "metrics": [metric]})

    def log_param(self, run_id: str, key: str, value: Any, **_: Any) -> Any:
        self._submit({"kind": "batch", "run": run_id, "params": [[key, str(value)]]})
        return value

    def set_tag(self, run_id: str, key: str, value: Any, **_: Any) -> None:
        self._submit({"kind": "batch", "run": run_id, "tags": [[key, str(value)]]})

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str | None = None) -> None:
        path = Path(local_path)
        if not path.exists():
            raise FileNotFoundError(f"cannot log {path} to MLflow: no such file or folder")
        op = {"kind": "artifact", "run": run_id, "artifact_path": artifact_path}
        self._submit(op, path.resolve())

    def log_artifacts(self, run_id: str, local_dir: str, artifact_path: str | None = None) -> None:
        self.log_artifact(run_id, local_dir, artifact_path)  # the snapshot keeps a folder a folder

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:  # the spool copies it before it is removed
            path = Path(tmp) / Path(artifact_file).name
            path.write_text(text)
            parent = Path(artifact_file).parent.as_posix()
            self.log_artifact(run_id, str(path), None if parent == "." else parent)

    def set_terminated(self, run_id: str, status: str | None = None,
                       end_time: int | None = None) -> None:  # fmt: skip
        op = {"kind": "terminate", "run": run_id, "status": status or "FINISHED"}
        self._submit({**op, "end_time": end_time or _now_ms()})

    def _submit(self, op: Op, source: Path | None = None) -> None:
        self._logger._worker.submit(op, source)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args: Any, **kwargs: Any) -> Any:
            from mlflow.exceptions import MlflowException

            worker, logger = self._logger._worker, self._logger
            # Probed first: the sender may be stuck in a call to a server that just went away,
            # and this call would then block for the client's whole retry budget.
            down = worker.down_since is not None or probe(worker.uri, logger._probe_timeout_s)
            if not down:
                worker.flush(logger._flush_timeout_s)
            if down or worker.down_since is not None:
                raise MlflowException(
                    f"MLflow tracking server {worker.uri} is unreachable; {name} needs it",
                    error_code="TEMPORARILY_UNAVAILABLE",
                )
            fix = logger._real_ids  # ids handed out while the run was provisional
            return attr(*(fix(a) for a in args), **{k: fix(v) for k, v in kwargs.items()})

        return call


class ResilientMLFlowLogger(MLFlowLogger):
    """MLFlowLogger (same arguments) plus: `spool_dir`, where writes wait for the server (keep
    it in the run folder: a resume finds its leftovers there); `flush_timeout_s`, how long
    `finalize` waits for them to go out (and for a server that is away to come back);
    `probe_timeout_s`, the `/health` probe's timeout; `buffered`, None = for http(s) URIs.

    MLFlowLogger has no hook for deferring or replacing its run creation, so this subclass
    works on its protected state (``_run_id``, ``_tracking_uri``, ``_experiment_name``, ...)
    as the subclass it is.
    """

    def __init__(
        self,
        experiment_name: str = "lightning_logs",
        run_name: str | None = None,
        tracking_uri: str | None = None,
        tags: dict[str, Any] | None = None,
        save_dir: str | None = "./mlruns",
        log_model: bool | str = False,
        prefix: str = "",
        artifact_location: str | None = None,
        run_id: str | None = None,
        synchronous: bool | None = None,
        spool_dir: str = "mlflow_spool",
        flush_timeout_s: float = 30.0,
        probe_timeout_s: float = 5.0,
        buffered: bool | None = None,
    ) -> None:
        tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        check_tracking_uri(tracking_uri)
        self._buffered = is_http(tracking_uri) if buffered is None else buffered
        if is_http(tracking_uri) and artifact_location and "://" not in artifact_location:
            # A path on this machine means nothing to a shared server: its own artifact store
            # (proxied through it) is used instead.
            artifact_location = None
        super().__init__(
            experiment_name, run_name, tracking_uri, tags, save_dir, log_model, prefix,
            artifact_location, run_id, synchronous,
        )  # fmt: skip
        self._spool_dir, self._flush_timeout_s = Path(spool_dir), flush_timeout_s
        self._probe_timeout_s = probe_timeout_s
        self._spool: Spool | None = None
        self._worker: SendWorker | None = None
        self._proxy: _ClientProxy | None = None
        self._left_after_flush = 0
        self._start_lock = threading.Lock()

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        if not self._buffered:
            return super().experiment
        with self._start_lock:
            if self._proxy is None:
                self._start()
        return self._proxy

    @property
    def run_id(self) -> str | None:
        """The server's run id; `offline-<hex>` until a run started during an outage exists."""
        _ = self.experiment
        return self._real_ids(self._run_id) if self._spool else self._run_id

    def sync_command(self) -> str:
        sync = "python -m train.cli.mlflow_sync"
        return f"{sync} {self._spool_dir} --tracking-uri {self._tracking_uri}"

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        if not self._buffered:
            return super().finalize(status)
        if self._worker is None:
            return None
        try:  # local work only (snapshots, the spool): nothing here waits on the tracker
            if self._checkpoint_callback:
                self._scan_and_log_checkpoints(self._checkpoint_callback)
            self.experiment.set_terminated(self._run_id, _STATUS.get(status, status))
        except OSError as e:
            log.warning(f"MLflow: could not spool the end of the run: {e}")
        self._flush(self._flush_timeout_s)
        return None

    def _flush(self, timeout: float) -> None:
        assert self._worker is not None
        left = self._left_after_flush = self._worker.flush(timeout)
        if left:
            log.warning(
                f"MLflow: {left} writes could not be sent to {self._tracking_uri} in "
                f"{timeout:.0f} s; nothing is lost, they are kept in {self._spool_dir}. Send "
                f"them when the server is up with:\n  {self.sync_command()}"
            )

    def _real_ids(self, value: Any) -> Any:
        if not isinstance(value, str) or PROVISIONAL_PREFIX not in value or self._spool is None:
            return value
        for provisional, real in self._spool.runs.get(self._tracking_uri, {}).copy().items():
            value = value.replace(provisional, real)
        return value

    def _start(self) -> None:
        """Open the spool, probe the server, and get a run: the server's, or a provisional one."""
        import mlflow

        mlflow.set_tracking_uri(self._tracking_uri)
        spool = self._spool = Spool(self._spool_dir)
        if not spool.hold():
            log.warning(f"MLflow spool {self._spool_dir} is held by another process")
        down = probe(self._tracking_uri, self._probe_timeout_s)
        if self._run_id is None and down is None:
            try:  # the server answers: create the experiment and run now, as MLFlowLogger does
                _ = super().experiment
            except Exception as e:
                if is_permanent(e):
                    raise
                down = f"{type(e).__name__}: {e}"
        if self._run_id is None:
            self._run_id = PROVISIONAL_PREFIX + uuid.uuid4().hex
        if spool.real_id(self._tracking_uri, self._run_id).startswith(PROVISIONAL_PREFIX):
            spool.append(self._create_run_op())  # idempotent: found again by its tag
        spool.update_meta(self._run_id, tracking_uri=self._tracking_uri,
                          experiment_name=self._experiment_name)  # fmt: skip
        self._worker = SendWorker(spool, self._tracking_uri, self._probe_timeout_s, down)
        self._proxy = _ClientProxy(self, self._mlflow_client)
        self._initialized = True
        self._worker.thread.start()
        atexit.register(self._at_exit)
        if down:
            log.warning(
                f"MLflow tracking server {self._tracking_uri} is unreachable ({down}). Training "
                f"goes on: run {self._run_id} is kept in {self._spool_dir} and sent when the "
                f"server answers. If it is still away when training ends, send it with:\n"
                f"  {self.sync_command()}"
            )

    def _create_run_op(self) -> Op:
        from mlflow.tracking.context.registry import resolve_tags
        from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

        tags = dict(self.tags or {})
        if self._run_name is not None:
            tags[MLFLOW_RUN_NAME] = self._run_name
        return {
            "kind": "create_run", "run": self._run_id, "start_time": _now_ms(),
            "experiment_name": self._experiment_name,
            "artifact_location": self._artifact_location,
            "tags": {k: str(v) for k, v in resolve_tags(tags).items()},
        }  # fmt: skip

    def _at_exit(self) -> None:
        # Writes made after finalize (or without one: a crash) get a short last chance.
        if self._worker is not None and len(self._worker.queue) > self._left_after_flush:
            self._flush(min(self._flush_timeout_s, 10.0))

    def __getstate__(self) -> dict[str, Any]:
        # Threads and locks do not pickle (spawn launchers); the copy starts its own worker.
        state = self.__dict__.copy()
        state.update(_spool=None, _worker=None, _proxy=None, _start_lock=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _start_lock=threading.Lock())
