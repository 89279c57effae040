"""The real ``img2dataset`` tool for the tests: its own virtualenv, a local image server, and a
small url list whose every row's expected image, caption and metadata are known.

img2dataset 1.47.0 pins ``webdataset<0.3`` and ``pandas<3``, which conflict with this project's
environment, so it lives in a separate virtualenv under the tools cache
(``$LDM_TOOLS_CACHE``, default ``~/.cache/ldm-pipeline``), created once and reused.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

IMG2DATASET_VERSION = "1.47.0"
VENV_NAME = f"img2dataset-{IMG2DATASET_VERSION}"
# img2dataset's console script (`img2dataset = img2dataset:main`), run through the venv's python:
# the script's shebang names the temporary directory the venv was built in, not the final one.
ENTRY = "import sys, img2dataset; sys.exit(img2dataset.main())"
PIP_TIMEOUT_S = 600
RUN_TIMEOUT_S = 300


def tools_cache() -> Path:
    return Path(os.environ.get("LDM_TOOLS_CACHE") or Path.home() / ".cache" / "ldm-pipeline")


def base_python() -> str:
    """A Python interpreter outside any virtualenv, to build the tool's own venv from."""
    base = getattr(sys, "_base_executable", None)
    if base and os.path.exists(base):
        return base
    found = shutil.which(f"python{sys.version_info.major}.{sys.version_info.minor}")
    return found or sys.executable


def _ready(venv: Path) -> bool:
    return (venv / "bin" / "img2dataset").exists() and (venv / "bin" / "python").exists()


class ToolInstallError(RuntimeError):
    pass


def ensure_img2dataset_venv(cache: Path | None = None) -> Path:
    """The img2dataset virtualenv, built on first use.

    It is built in a temporary sibling directory and renamed into place, so an interrupted or
    failed install never leaves a directory that looks finished; when another process finished
    first, its venv is used.
    """
    cache = cache or tools_cache()
    venv = cache / VENV_NAME
    if _ready(venv):
        return venv
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{VENV_NAME}.tmp-", dir=cache))
    try:
        steps = [
            [base_python(), "-m", "venv", str(tmp)],
            [
                str(tmp / "bin" / "python"),
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--no-input",
                "--quiet",
                f"img2dataset=={IMG2DATASET_VERSION}",
            ],
        ]
        for cmd in steps:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False
            )
            if proc.returncode != 0:
                tail = (proc.stdout + proc.stderr)[-3000:]
                raise ToolInstallError(
                    f"could not build the img2dataset {IMG2DATASET_VERSION} virtualenv "
                    f"({' '.join(cmd)} exited with {proc.returncode}); it needs PyPI access "
                    f"once, after which {venv} is reused (set LDM_TOOLS_CACHE to move it, or "
                    f"build it there by hand: python3 -m venv {venv} && {venv}/bin/pip install "
                    f"img2dataset=={IMG2DATASET_VERSION}).\n{tail}"
                )
        if not _ready(tmp):
            raise ToolInstallError(
                f"pip installed img2dataset but {tmp}/bin/img2dataset is missing"
            )
        tmp.chmod(0o755)  # mkdtemp made it private
        try:
            os.rename(tmp, venv)
        except OSError:
            if not _ready(venv):  # not another process's finished venv: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return venv


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server and anything it started: its own process group, by id."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@contextlib.contextmanager
def serve_directory(root: Path, attempts: int = 3) -> Iterator[str]:
    """``http://127.0.0.1:PORT`` serving ``root`` with ``python -m http.server``."""
    last_error = ""
    for _ in range(attempts):
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
            cwd=root,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and proc.poll() is None:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    if s.connect_ex(("127.0.0.1", port)) == 0:
                        break
                time.sleep(0.05)
            else:
                # Exited (the port was taken between free_port and bind) or never answered.
                _stop(proc)
                last_error = proc.stderr.read().decode(errors="replace")[-2000:]
                continue
            yield f"http://127.0.0.1:{port}"
            return
        finally:
            _stop(proc)
            proc.stderr.close()
    raise RuntimeError(f"http.server did not start on 127.0.0.1 in {attempts} tries: {last_error}")


@dataclass(frozen=True)
class Row:
    """One url-list row and what img2dataset should make of it."""

    url: str
    caption: str
    aesthetic: float
    alt: str | None
    width: int = 0  # of the served image; 0 for a url that answers 404
    height: int = 0
    colour: tuple[int, int, int] = (0, 0, 0)

    @property
    def served(self) -> bool:
        return self.width > 0


# (width, height) of the served images, cycled: square, wide, tall, tiny and one larger than
# img2dataset's image_size (it is resized, so only the json's original_* tell its real size).
SIZES = [(64, 64), (128, 64), (48, 96), (20, 20), (200, 100), (64, 64)]
NUM_IMAGES = 24
MISSING_AT = (3, 15)  # url-list positions of the two urls that answer 404
LEVELS = (30, 130, 230)  # solid colours far apart, recognisable after JPEG and resizing


def colour(i: int) -> tuple[int, int, int]:
    return LEVELS[i % 3], LEVELS[i // 3 % 3], LEVELS[i // 9 % 3]


def aesthetic(i: int) -> float:
    # 3.0 .. 8.5 in steps of 0.5; includes 5.0 and 6.0 exactly (the bounds the tests use).
    return 3.0 + (i * 5 % 12) * 0.5


def write_images(root: Path) -> list[Row]:
    """Write the served images into ``root``; the url list's rows, urls relative to the server
    root (prefixed later), two of them missing files."""
    rows: list[Row] = []
    for i in range(NUM_IMAGES):
        w, h = SIZES[i % len(SIZES)]
        fmt = "png" if (i // len(SIZES)) % 2 else "jpg"
        name = f"img_{i:02d}.{fmt}"
        image = Image.new("RGB", (w, h), colour(i))
        buf = io.BytesIO()
        image.save(buf, format="PNG" if fmt == "png" else "JPEG", quality=95)
        (root / name).write_bytes(buf.getvalue())
        caption = f"picture {i}: a {w}x{h} {fmt} in colour {colour(i)}"
        if i % 4 == 1:
            caption += " — café ünïcode ✓"  # non-ASCII survives img2dataset and our reader
        alt = None if i % 6 == 5 else f"alt text of picture {i}"
        rows.append(Row(name, caption, aesthetic(i), alt, w, h, colour(i)))
    for n, pos in enumerate(MISSING_AT):
        rows.insert(pos, Row(f"missing_{n}.jpg", f"never served {n}", 9.0, f"alt missing {n}"))
    return rows


def write_url_list(rows: list[Row], base_url: str, path: Path) -> Path:
    """A parquet url list: url, caption, aesthetic (float) and alt (string, some null)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "url": pa.array([f"{base_url}/{r.url}" for r in rows], pa.string()),
            "caption": pa.array([r.caption for r in rows], pa.string()),
            "aesthetic": pa.array([r.aesthetic for r in rows], pa.float64()),
            "alt": pa.array([r.alt for r in rows], pa.string()),
        }
    )
    pq.write_table(table, path)
    return path


def run_img2dataset(venv: Path, url_list: Path, out: Path, samples_per_shard: int = 10) -> None:
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy")}
    env.update(NO_ALBUMENTATIONS_UPDATE="1", WANDB_MODE="disabled", NO_PROXY="127.0.0.1")
    env["no_proxy"] = "127.0.0.1"
    cmd = [
        str(venv / "bin" / "python"),
        "-c",
        ENTRY,
        "--url_list",
        str(url_list),
        "--input_format",
        "parquet",
        "--url_col",
        "url",
        "--caption_col",
        "caption",
        "--save_additional_columns",
        '["aesthetic","alt"]',
        "--output_format",
        "webdataset",
        "--output_folder",
        str(out),
        "--processes_count",
        "1",
        "--thread_count",
        "4",
        "--image_size",
        "64",
        "--resize_mode",
        "keep_ratio",
        "--resize_only_if_bigger",
        "True",
        "--number_sample_per_shard",
        str(samples_per_shard),
        "--timeout",
        "10",
        "--enable_wandb",
        "False",
        "--distributor",
        "multiprocessing",
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=env, timeout=RUN_TIMEOUT_S, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"img2dataset exited with {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}"
        )
