"""The durable spool of MLflow writes and the sender that replays it in order.

`ResilientMLFlowLogger` appends every write here before it sends it, so neither a tracker outage
nor a process that dies while the server is away loses anything; `train.cli.mlflow_sync` sends what
is left.

Layout of a spool folder: `ops.jsonl` (one write a line, numbered), `acked` (the number of the
last write the server took: writes go in order), `artifacts/<n>/` (files as they were when
logged), `runs.json` (per tracking URI: provisional run id -> the server's), `meta.json`,
`rejected.jsonl` (writes the server refused, with its reason). Replaying is idempotent: acked
writes are skipped, the SQL store drops exact duplicate metric points (same key, step,
timestamp and value), params and tags are set to the same values again, artifacts overwrite
themselves, and a run created from the spool is found again by its `ldm.spool_run_id` tag.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import ssl
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from train.errors import ConfigError

PROVISIONAL_PREFIX = "offline-"  # a run id the server has not given yet
SPOOL_TAG = "ldm.spool_run_id"
BATCH_LIMITS = {"metrics": 1000, "params": 100, "tags": 100}  # MLflow's log_batch
LINK_MIN_BYTES = 64 * 2**20
MAX_STRIKES = 5  # "transient" failures of one write while the server answers /health
Op = dict[str, Any]
log = logging.getLogger(__name__)


class Unreachable(Exception):
    """The tracker did not answer; the write stays queued."""


def is_http(uri: str | None) -> bool:
    return bool(uri) and uri.split(":", 1)[0].lower() in ("http", "https")


def check_tracking_uri(uri: str | None) -> None:
    """Refuse server URIs with credentials in them: they end up in configs, logs and params."""
    if not is_http(uri):
        return
    parts = urllib.parse.urlsplit(uri)
    if parts.username is not None or parts.password is not None:
        redacted = f"{parts.scheme}://***@{parts.netloc.rsplit('@', 1)[1]}{parts.path}"
        raise ConfigError(
            f"the MLflow tracking URI {redacted} holds credentials; give the bare URI and put "
            "them in the environment instead: MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN"
        )


def probe(uri: str, timeout: float) -> str | None:
    """None when the tracker answers `/health` (any status below 500 means it is up), else why
    not. Local stores always answer."""
    if not is_http(uri):
        return None
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):
            return None
    except urllib.error.HTTPError as e:
        return None if e.code < 500 else f"HTTP {e.code}"
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        # A TLS setup this probe does not share (MLFLOW_TRACKING_SERVER_CERT_PATH) still proves
        # that something answers; the client's own settings decide about the real calls.
        return None if isinstance(reason, ssl.SSLError) else str(reason) or type(e).__name__


def is_permanent(e: BaseException) -> bool:
    """A refusal that retrying cannot change (bad value, missing run); not auth or overload."""
    from mlflow.exceptions import MlflowException

    if isinstance(e, FileNotFoundError):
        return True  # the snapshot of an artifact is gone
    if isinstance(e, MlflowException):
        code = e.get_http_status_code()
        return 400 <= code < 500 and code not in (401, 403, 408, 429)
    return False


def _link_or_copy(src: str, dst: str) -> str:
    # Small files are copied: some writers (PIL, json dumps) rewrite a file in place, which a
    # hard link would follow. Large ones (checkpoints, weights) are linked, as copying them
    # would stall the trainer; they are written aside and renamed into place (a new inode), so
    # the link keeps the content it had, and survives keep-top-k deleting the original.
    if os.path.getsize(src) >= LINK_MIN_BYTES:
        with contextlib.suppress(OSError):
            os.link(src, dst)
            return dst
    return shutil.copy2(src, dst)


class Spool:
    """Append-only log of writes with an acknowledged watermark; safe to share between the
    trainer thread (appends) and the sender thread (acks)."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ops_path = self.dir / "ops.jsonl"
        self._lock = threading.Lock()
        self._held: Any = None
        acked = self.dir / "acked"
        self.acked = int(acked.read_text()) if acked.exists() else 0
        self._seq = max([self.acked, *(op["seq"] for op in self._read())])
        self.runs: dict[str, dict[str, str]] = self._json("runs.json")

    def hold(self) -> bool:
        """Take the spool for this process (advisory lock); False if another one has it."""
        self._held = open(self.dir / "lock", "w")  # noqa: SIM115 - held for the process's life
        try:
            fcntl.flock(self._held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        return True

    def meta(self) -> dict[str, Any]:
        return self._json("meta.json")

    def update_meta(self, run_id: str, **values: Any) -> None:
        meta = self.meta() | values
        meta["runs"] = sorted({*meta.get("runs", []), run_id})
        self._write_json("meta.json", meta)

    def real_id(self, uri: str, run_id: str) -> str:
        return self.runs.get(uri, {}).get(run_id, run_id)

    def map_run(self, uri: str, provisional: str, real: str) -> None:
        with self._lock:
            self.runs.setdefault(uri, {})[provisional] = real
            self._write_json("runs.json", self.runs)

    def append(self, op: Op, source: Path | None = None) -> Op:
        """Number `op`, snapshot its file or folder, and append it. A spool that cannot be
        written (disk full) costs a warning: the op is still sent, from memory."""
        with self._lock:
            self._seq += 1
            op["seq"] = self._seq
            try:
                if source is not None:
                    dest = self.dir / "artifacts" / str(self._seq) / source.name
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    if source.is_dir():
                        shutil.copytree(source, dest, copy_function=_link_or_copy)
                    else:
                        _link_or_copy(str(source), str(dest))
                    op["snapshot"] = str(dest.relative_to(self.dir))
                with self.ops_path.open("a") as f:
                    f.write(json.dumps(op) + "\n")
            except OSError as e:
                if source is not None:
                    op.setdefault("source", str(source))  # sent from the original, if still there
                log.warning(f"MLflow spool {self.dir} not writable ({e}); a write kept in memory")
        return op

    def pending(self) -> list[Op]:
        return [op for op in self._read() if op["seq"] > self.acked]

    def ack(self, ops: list[Op]) -> None:
        with self._lock:
            self.acked = max(self.acked, ops[-1]["seq"])
            tmp = self.dir / "acked.tmp"
            tmp.write_text(str(self.acked))
            os.replace(tmp, self.dir / "acked")
            for op in ops:
                if "snapshot" in op and not op.get("rejected"):  # a refused one stays to see
                    shutil.rmtree(self.dir / "artifacts" / str(op["seq"]), ignore_errors=True)
            if self.acked >= self._seq:  # all sent: start the log afresh (numbers go on)
                self.ops_path.write_text("")

    def reject(self, op: Op, error: BaseException) -> None:
        op["rejected"] = True
        with self._lock, (self.dir / "rejected.jsonl").open("a") as f:
            f.write(json.dumps({**op, "error": str(error)[:2000]}) + "\n")

    def _read(self) -> list[Op]:
        if not self.ops_path.exists():
            return []
        ops = []
        for line in self.ops_path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a line torn by a crash
                ops.append(json.loads(line))
        return ops

    def _json(self, name: str) -> dict:
        path = self.dir / name
        return json.loads(path.read_text()) if path.exists() else {}

    def _write_json(self, name: str, value: dict) -> None:
        tmp = self.dir / f"{name}.tmp"
        tmp.write_text(json.dumps(value, indent=1))
        os.replace(tmp, self.dir / name)


class Sender:
    """Sends the head of a list of spooled writes (consecutive metric/param/tag writes of one
    run as one `log_batch`), acks what the server took and rejects what it refused."""

    def __init__(self, spool: Spool, uri: str) -> None:
        from mlflow import MlflowClient

        self.spool, self.uri, self.client = spool, uri, MlflowClient(uri)
        self._strikes, self._single, self.rejected = 0, 0, 0

    def send(self, ops: list[Op]) -> int:
        """Send one call's worth from the head of `ops`; returns how many ops it settled.
        Raises Unreachable when the tracker did not answer (nothing settled)."""
        group = ops[:1] if self._single else _batch_group(ops)
        try:
            self._call(group)
        except Exception as e:
            if not (is_permanent(e) or self._struck_out()):
                raise Unreachable(f"{type(e).__name__}: {e}") from e
            if len(group) > 1:
                self._single = len(group)  # find the refused write: one by one
                return 0
            self.spool.reject(group[0], e)
            self.rejected += 1
            log.warning(f"MLflow refused a write ({e}); kept in {self.spool.dir}/rejected.jsonl")
        self._strikes, self._single = 0, max(0, self._single - 1)
        self.spool.ack(group)
        return len(group)

    def real_id(self, run_id: str) -> str:
        return self.spool.real_id(self.uri, run_id)

    def _struck_out(self) -> bool:
        # A server error again and again while /health answers is one retrying will not fix.
        if probe(self.uri, 5.0) is not None:
            return False
        self._strikes += 1
        return self._strikes >= MAX_STRIKES

    def _call(self, group: list[Op]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        op = group[0]
        if op["kind"] == "create_run":
            return self._create_run(op)
        run = self.real_id(op["run"])
        if op["kind"] == "batch":
            metrics = [Metric(k, v, ts, st) for o in group for k, v, ts, st in o.get("metrics", ())]
            params = {k: v for o in group for k, v in o.get("params", ())}
            tags = {k: v for o in group for k, v in o.get("tags", ())}
            self.client.log_batch(
                run, metrics, [Param(k, v) for k, v in params.items()],
                [RunTag(k, v) for k, v in tags.items()],
            )  # fmt: skip
        elif op["kind"] == "artifact":
            path = self.spool.dir / op["snapshot"] if "snapshot" in op else Path(op["source"])
            if not path.exists():
                raise FileNotFoundError(f"artifact snapshot {path} is gone")
            upload = self.client.log_artifacts if path.is_dir() else self.client.log_artifact
            upload(run, str(path), op.get("artifact_path"))
        elif op["kind"] == "terminate":
            self.client.set_terminated(run, op["status"], op["end_time"])
        return None

    def _create_run(self, op: Op) -> None:
        provisional = op["run"]
        if self.real_id(provisional) != provisional:
            return
        name, client = op["experiment_name"], self.client
        exp = client.get_experiment_by_name(name)
        if exp is not None and exp.lifecycle_stage != "deleted":
            exp_id = exp.experiment_id
        else:
            exp_id = client.create_experiment(name, artifact_location=op.get("artifact_location"))
        # Found again by its tag: a replay after a crash between create and ack makes no twin.
        found = client.search_runs(
            [exp_id], filter_string=f"tags.`{SPOOL_TAG}` = '{provisional}'", max_results=1
        )
        if found:
            real = found[0].info.run_id
        else:
            tags = {**op["tags"], SPOOL_TAG: provisional}
            real = client.create_run(exp_id, start_time=op["start_time"], tags=tags).info.run_id
        self.spool.map_run(self.uri, provisional, real)


def _batch_group(ops: list[Op]) -> list[Op]:
    """The head op, and the batch writes of the same run after it that fit one `log_batch`.
    A param key seen twice ends the group: its second value must fail as it would alone."""
    head, group, keys = ops[0], [], set()
    counts = dict.fromkeys(BATCH_LIMITS, 0)
    for op in ops if head["kind"] == "batch" else ():
        params = {k for k, _ in op.get("params", ())}
        counts = {k: n + len(op.get(k, ())) for k, n in counts.items()}
        over = any(n > BATCH_LIMITS[k] for k, n in counts.items())
        if group and (op["kind"] != "batch" or op["run"] != head["run"] or over or keys & params):
            break
        group.append(op)
        keys |= params
    return group or [head]
