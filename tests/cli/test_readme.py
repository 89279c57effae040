"""The shell examples of the README and of every docs/*.md page, run through bash: every
`ldm-train`, `ldm-submit` and `ldm-data` line of their ```bash blocks must parse as the user would
paste it, and a brace pattern must reach the config unchanged (bash strips one level of quotes;
Hydra's parser rejects a bare `{`). Each block is one test case, named by page and the line of
its opening fence (e.g. `docs/data.md:97`): its lines run in order in a fresh folder, as a reader
pastes them (a later line may read what an earlier one wrote). The pages' relative links must
lead to a page and heading that exist, so moving a section between pages breaks no link.

bash does the word splitting (quotes, `\\` continuations, `$USER`): the three commands are shell
functions that hand back the argv bash built, and the real entry points run on it in the test
process with a suffix that composes without training (`ldm-train --cfg job`, `ldm-submit
--dry-run`). A fresh process per line would add 8-10 s of imports each and prove nothing more:
the process boundary is not the subject, the shell's quoting is."""

from __future__ import annotations

import io
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from cli_runner import run_cli
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
# The README and the reference pages it links to; a new page is picked up without listing it.
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
PROGRAMS = ("ldm-train", "ldm-submit", "ldm-data")
# Lines not run here, by how they start, and why. A new command on any page that is neither one
# of PROGRAMS nor listed here fails test_every_command_is_run_or_listed: classify it.
NOT_RUN = {
    "make demo": "the demo itself: sets up .venv and trains both stages (minutes)",
    "make test": "the suite itself",
    "torchrun --nnodes=2": "two nodes and a rendezvous host",
    "srun --nodes=2": "a SLURM allocation (tests/jobs/test_slurm_jobs.py runs srun locally)",
    "export SLURM_CONF=": "the local cluster's config: only the cluster commands below read it",
    "squeue; scancel": "a running job on the local cluster (tests/jobs/test_slurm_jobs.py)",
    "sacct -j": "a finished job on the local cluster (tests/jobs/test_slurm_jobs.py)",
    "python -m support.slurm_local down": "stops a local cluster this test never starts",
    "ldm-export outputs/runs/demo/": "a trained checkpoint (tests/cli/test_sampling_cli.py)",
    "ldm-export outputs/runs/sd15-finetune/": "an SD-1.5-size export "
    "(tests/exports/test_single_file.py checks the layout at full size on the meta device)",
    "ldm-sample /tmp/my-export": "an export (tests/cli/test_sampling_cli.py)",
    "ldm-sample outputs/runs/demo/export": "a trained export and images "
    "(tests/cli/test_sampling_images.py)",
    "ldm-sample /models/my-sd15": "a pretrained pipeline and a LoRA (tests/finetune/test_lora.py)",
    "ldm-sample outputs/runs/controlnet/export": "a ControlNet export and a control image "
    "(tests/finetune/test_controlnet.py)",
    "ldm-eval outputs/runs/demo-dit/export": "a trained demo_dit export (minutes of training)",
    "ldm-eval outputs/runs/demo/export --reference": "an export and a CLIP model "
    "(tests/evaluation/test_ldm_eval.py runs it on tiny ones)",
}
# Placeholders made real for this machine (applied to the line before bash reads it).
SUBSTITUTE = {
    "/tmp/shapes": "{tmp}/shapes",  # the local-cluster walk-through writes and submits these
    "--samples-per-shard 1000": "--samples-per-shard 1",  # 10 photos -> the 10 shards inspected
    "--workers 8": "--workers 1",  # two cores here
}
# `ldm-submit` lines whose data lives on the cluster: the login-node path check is turned off.
CLUSTER_PATHS = ("/lustre/",)
BRACE = re.compile(r"/[^\s'\"]*\{\d+\.\.\d+\}[^\s'\"]*")


def bash_blocks(text: str) -> list[tuple[int, list[str]]]:
    """Each ```bash block as (line number of its opening fence, its command lines), continuations
    joined, comments dropped."""
    blocks = []
    for match in re.finditer(r"^```bash\n(.*?)^```", text, flags=re.M | re.S):
        lines = []
        for line in match.group(1).replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                lines.append(" ".join(line.split()))
        blocks.append((text.count("\n", 0, match.start()) + 1, lines))
    return blocks


def command_lines(text: str) -> list[str]:
    """The command lines of the ```bash blocks, in page order."""
    return [line for _, lines in bash_blocks(text) for line in lines]


def page_name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def program_blocks() -> list:
    """One pytest param per ```bash block that runs at least one of PROGRAMS, id `page:line`."""
    return [
        pytest.param(lines, id=f"{page_name(page)}:{number}")
        for page in PAGES
        for number, lines in bash_blocks(page.read_text())
        if any(line.startswith(PROGRAMS) for line in lines)
    ]


def outside_code(text: str) -> str:
    """`text` without fenced blocks and inline code: a `#` comment in a block is no heading, and
    `](` inside code is no link."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(page: Path) -> set[str]:
    """The `#fragment`s GitHub gives the page's headings: lower case, punctuation dropped, spaces
    as `-`, a repeated heading suffixed `-1`, `-2`..."""
    seen: dict[str, int] = {}
    found = set()
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        found.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return found


def bash_argv(line: str) -> list[str]:
    """What bash passes to the command `line` runs (the commands are functions printing it)."""
    dump = "".join(f'{p}() {{ printf "%s\\0" {p} "$@"; }}; ' for p in PROGRAMS)
    out = subprocess.run(["bash", "-c", dump + line], capture_output=True, text=True, check=True)
    return out.stdout.split("\0")[:-1]


def parsed_value(override: str) -> object:
    """The value Hydra's override parser reads from `override` (as `ldm-train` would)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides([override])[0].value()


def job_arguments(job: str) -> list[str]:
    """The training arguments of a rendered job: sbatch script words (as bash splits them) or
    the strings of a Kubernetes manifest (containers exec their command without a shell)."""
    if job.startswith("#!"):
        return shlex.split(job.replace("\\\n", " "), comments=True)
    found: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            node = list(node.values())
        if isinstance(node, list):
            for item in node:
                walk(item)
        elif isinstance(node, str):
            found.append(node)

    for doc in yaml.safe_load_all(job):
        walk(doc)
    return found


def run_train(argv: list[str]) -> dict:
    from train.cli.train import main

    # Hydra refuses --cfg with --multirun; the sweep's job config composes the same without it.
    args = [a for a in argv[1:] if a not in ("-m", "...")]  # `...`: "and your other overrides"
    proc = run_cli(main, ["ldm-train", *args, "--cfg", "job"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    return yaml.safe_load(proc.stdout)


def run_data(argv: list[str]) -> dict | None:
    from train.cli.data import build_parser, main

    if argv[1] == "stats":  # needs a CLIP model or Inception file: its arguments are parsed
        build_parser().parse_args(argv[1:])
        return None
    if argv[1] == "encode":  # its overrides are ldm-train's: composed before any model loads
        from omegaconf import OmegaConf

        from train.config.compose import compose

        cfg = compose(build_parser().parse_args(argv[1:]).overrides)
        return OmegaConf.to_container(cfg)
    proc = run_cli(lambda: sys.exit(main(argv[1:])), argv)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return None


def run_submit(argv: list[str], line: str) -> list[str]:
    from jobs.submit import cli

    extra = ["launcher.check_paths=false"] if any(p in line for p in CLUSTER_PATHS) else []
    dry = [] if "--dry-run" in argv else ["--dry-run"]
    # Before the user's words: argparse takes no overrides after the README's `--dry-run`.
    proc = run_cli(cli, [argv[0], *extra, *argv[1:], *dry])
    assert proc.returncode == 0, proc.stderr[-2000:]
    return job_arguments(proc.stdout)


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """`photos/` for the data-tools block: 10 captioned images (and `videos/` beside it)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(10):
        Image.new("RGB", (8, 8), (25 * i, 0, 0)).save(folder / f"p{i}.png")
        (folder / f"p{i}.txt").write_text(f"photo number {i}")
    videos = tmp_path / "videos"  # and `videos/` for the video-shards block: 2 captioned clips
    videos.mkdir()
    for i in range(2):
        (videos / f"v{i}.mp4").write_bytes(tiny_mp4(8 + 4 * i))
        (videos / f"v{i}.txt").write_text(f"clip number {i}")
    return folder


def tiny_mp4(frames: int) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
        for i in range(frames):
            image = np.full((16, 16, 3), 10 * i, np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        out.mux(stream.encode())
    return buf.getvalue()


@pytest.mark.parametrize("page", PAGES, ids=page_name)
def test_every_command_is_run_or_listed(page: Path) -> None:
    unclassified = [
        line for line in command_lines(page.read_text())
        if not line.startswith(PROGRAMS) and not any(line.startswith(s) for s in NOT_RUN)
    ]  # fmt: skip
    assert unclassified == [], f"{page_name(page)}: commands neither run here nor in NOT_RUN"


def test_not_run_names_only_lines_the_pages_have() -> None:
    lines = [line for page in PAGES for line in command_lines(page.read_text())]
    listed = {start for start in NOT_RUN for line in lines if line.startswith(start)}
    assert listed == set(NOT_RUN), "NOT_RUN names lines no page has any more"


def test_the_pages_have_their_commands() -> None:
    """The blocks below are found at all: a parse that found none would pass them vacuously."""
    lines = [line for page in PAGES for line in command_lines(page.read_text())]
    assert sum(line.startswith(PROGRAMS) for line in lines) >= 12, lines


@pytest.mark.parametrize("lines", program_blocks())
def test_commands_parse_in_bash_and_keep_brace_patterns(
    lines: list[str], tmp_path: Path, photos: Path, monkeypatch
) -> None:
    """In block order, in a folder with the photos the data-tools block reads: each line exits 0,
    and every brace pattern it gives reaches the config (or the rendered job) unchanged."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LDM_OUTPUT_DIR", str(tmp_path / "outputs"))
    ran = []
    for line in lines:
        if not line.startswith(PROGRAMS):
            continue
        for old, new in SUBSTITUTE.items():
            line = line.replace(old, new.format(tmp=tmp_path))
        argv = bash_argv(line)
        patterns = BRACE.findall(line) if "data.urls" in line else []
        if argv[0] == "ldm-train" or argv[1] == "encode":
            cfg = run_train(argv) if argv[0] == "ldm-train" else run_data(argv)
            assert [cfg["data"]["urls"]] == patterns or not patterns, line
        elif argv[0] == "ldm-submit":
            urls = [a for a in run_submit(argv, line) if a.startswith("data.urls=")]
            # every pod or task gets it (a PyTorchJob: the master's and the workers' command)
            assert {parsed_value(a) for a in urls} == set(patterns) or not patterns, line
        else:
            run_data(argv)
            if argv[1] == "from-folder":  # `ldm-data from-folder IN OUT`: wrote what it read
                sizes = json.loads((Path(argv[3]) / "sizes.json").read_text())
                assert sum(sizes.values()) == len(list(Path(argv[2]).glob("*.txt"))), line
        ran.append(line)
    assert ran, lines


@pytest.mark.parametrize("page", PAGES, ids=page_name)
def test_relative_links_lead_to_a_page_and_heading(page: Path) -> None:
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", outside_code(page.read_text())):
        if re.match(r"[a-z]+:", target):  # https:, mailto:: not checked offline
            continue
        path, _, fragment = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists() or (fragment and fragment not in anchors(linked)):
            broken.append(target)
    assert broken == [], f"{page_name(page)}: links to no page or heading"


def test_readme_links_every_docs_page() -> None:
    linked = set(re.findall(r"\]\((docs/[^)#\s]+)", README.read_text()))
    assert {page_name(p) for p in PAGES[1:]} <= linked, "a docs/ page the README does not list"
