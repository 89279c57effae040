"""The rules of the layout that a test can check (CONTRIBUTING.md, "Layout rules"): no import
circles, no upward arrows, objectives that import torch only, the UNet named in one place, and
DictConfig read only where configs are composed and run."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("train", "data", "jobs")
# Where Hydra/OmegaConf may be imported: the entry points, config handling, and the Hydra sweep
# callback (Hydra calls it with the config); `module_types` resolves class names for a config.
READS_CONFIG = ("train/cli/", "train/config/", "jobs/submit.py", "train/tracking/sweep.py",
                "train/tracking/trial.py", "train/distributed/strategies.py")  # fmt: skip
# What objectives may import besides the standard library and train.objectives.
OBJECTIVE_IMPORTS = ("torch", "diffusers", "__future__")
# The UNet adapter (and the ControlNet over a UNet), the old-checkpoint upgrade, and the
# single-file format (SD's UNet layout).
UNET_ADAPTER = ("train/models/backbones/unet.py", "train/tasks/legacy.py",
                "train/exports/single_file.py",
                "train/models/backbones/controlnet.py")  # fmt: skip


def modules() -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def runtime_imports(path: Path) -> list[str]:
    """Modules `path` imports, at any depth, except under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text())
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
               and getattr(node.test, "id", None) == "TYPE_CHECKING"
               for n in ast.walk(node)}  # fmt: skip
    names = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return names


def graph() -> dict[str, set[str]]:
    mods = modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        for name in runtime_imports(path):
            if name.split(".")[0] in PACKAGES and (target := resolve(name)) not in (None, mod):
                edges[mod].add(target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan 1972)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while (w := stack.pop()) != v:
                comp.append(w)
            comp.append(v)
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circles():
    assert cycles(graph()) == []


def test_data_imports_no_train_and_jobs_no_entry_point():
    edges = graph()
    up = {(m, t) for m, ts in edges.items() for t in ts
          if (m.startswith("data") and t.startswith("train"))
          or (m.startswith("jobs") and t.startswith("train.cli"))}  # fmt: skip
    assert up == set()


def test_errors_is_a_leaf():
    assert graph()["train.errors"] == set()


@pytest.mark.parametrize("path", sorted((ROOT / "train" / "objectives").glob("*.py")),
                         ids=lambda p: p.name)  # fmt: skip
def test_objectives_import_torch_only(path: Path):
    import sys

    bad = [n for n in runtime_imports(path)
           if n.split(".")[0] not in (*OBJECTIVE_IMPORTS, *sys.stdlib_module_names)
           and not n.startswith("train.objectives")]  # fmt: skip
    assert bad == []


def test_only_the_unet_adapter_names_the_unet():
    offenders = []
    for path in modules().values():
        rel = str(path.relative_to(ROOT))
        if rel in UNET_ADAPTER:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "unet":
                offenders.append(f"{rel}:{node.lineno}")
    assert offenders == []


def test_only_entry_points_and_config_code_read_dictconfig():
    offenders = []
    for path in modules().values():
        rel = str(path.relative_to(ROOT))
        if rel.startswith(READS_CONFIG):
            continue
        if any(n.split(".")[0] in ("omegaconf", "hydra") for n in runtime_imports(path)):
            offenders.append(rel)
    assert offenders == []


# Private names of the libraries we build on that the code still imports, each with the comment
# at its import saying why no public API does it. Anything new must join this list on purpose.
PRIVATE_IMPORTS_ALLOWED = {
    "train/callbacks/console.py": {"_format_summary_table"},
    "train/distributed/strategies.py": {"_setup_activation_checkpointing"},
}
LIBRARIES = ("lightning", "mlflow", "torch", "diffusers", "transformers", "deepspeed", "hydra",
             "omegaconf", "webdataset", "peft")  # fmt: skip


def private_imports(path: Path) -> set[str]:
    """Underscored names (or modules) `path` imports from the libraries above."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] not in LIBRARIES:
                continue
            parts = node.module.split(".") + [a.name for a in node.names]
            found |= {p for p in parts if p.startswith("_") and not p.startswith("__")}
    return found


def test_private_library_imports_are_the_listed_ones():
    found = {str(p.relative_to(ROOT)): private_imports(p) for p in modules().values()}
    assert {rel: names for rel, names in found.items() if names} == PRIVATE_IMPORTS_ALLOWED
