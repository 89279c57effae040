"""`ldm-mlflow-sync DIR` (`python -m train.cli.mlflow_sync DIR`): send what a tracker outage left
in a run's MLflow spool (`train/tracking/spool.py`), idempotently."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from train.errors import ArgumentParser, ConfigError, bad_input, debug_flag
from train.tracking.spool import Sender, Spool, Unreachable, check_tracking_uri, probe


def find_spool(path: Path) -> Path:
    """The spool itself, or the `mlflow_spool` folder of a run folder."""
    if (path / "meta.json").exists() or (path / "ops.jsonl").exists():
        return path
    if (path / "mlflow_spool").is_dir():
        return path / "mlflow_spool"
    raise ConfigError(f"{path} is neither an MLflow spool nor a run folder with mlflow_spool/; "
                      "pass runs/<run> or its mlflow_spool/ folder")  # fmt: skip


def sync(directory: Path, tracking_uri: str | None = None, wait_s: float = 60.0) -> int:
    """Send everything left in the spool; prints the runs it holds. Returns an exit code."""
    spool = Spool(find_spool(directory))
    if not spool.hold():
        print(f"{spool.dir} is in use by a running process; it sends the spool itself")
        return 3
    uri = tracking_uri or spool.meta().get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ConfigError(f"{spool.dir} names no tracking URI: pass --tracking-uri or set "
                          "MLFLOW_TRACKING_URI")  # fmt: skip
    check_tracking_uri(uri)
    sender, ops = Sender(spool, uri), spool.pending()
    total, deadline = len(ops), time.monotonic() + wait_s
    reason = probe(uri, 5.0)
    while ops:
        if reason is None:
            try:
                ops = ops[sender.send(ops) :]
                continue
            except Unreachable as e:
                reason = str(e)
        if time.monotonic() > deadline:
            print(f"MLflow tracking server {uri} unreachable ({reason}); {len(ops)} of {total} "
                  f"writes still in {spool.dir}: run this again when it is up")  # fmt: skip
            return 1
        time.sleep(2.0)
        reason = probe(uri, 5.0)
    refused = f" ({sender.rejected} refused: see rejected.jsonl)" if sender.rejected else ""
    print(f"Sent {total} spooled writes to {uri}{refused}")
    for run in spool.meta().get("runs", []):
        print(f"MLflow run: {sender.real_id(run)} (experiment "
              f"{spool.meta().get('experiment_name')!r}) at {uri}")  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(
        prog="ldm-mlflow-sync", description="Send an MLflow spool left by a tracker outage."
    )
    parser.add_argument("path", type=Path, help="the spool folder, or the run folder holding it")
    parser.add_argument("--tracking-uri", help="default: the one the run used")
    parser.add_argument("--wait", type=float, default=60.0, help="seconds to retry an outage")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    with bad_input("Config error:", debug_flag(args)):
        code = sync(args.path, args.tracking_uri, args.wait)
    sys.exit(code)


if __name__ == "__main__":
    main()
