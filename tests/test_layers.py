"""The packages form layers: each imports only from its own package and those below it.

The table is the architecture as the folders draw it (docs/architecture.md): a package may be
moved up or down here only with the picture there.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "modelfs"

# Lowest first. Packages on one line do not import each other.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors",),
    ("untrusted", "pieces", "modelpack", "reference", "logs", "sizes"),
    ("artifact", "transport", "jsonsocket"),
    ("sources",),
    ("cache",),
    ("fetcher",),
    ("prefetch",),
    ("builder", "metrics", "testing"),
    ("scheduler",),
    ("peer", "fs"),
    ("mount",),
    ("service",),
    ("snapshot",),
    ("cli",),
    ("__main__",),
)
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _part(path: Path) -> str:
    """The top-level part of modelfs a file belongs to: its package, or its module."""
    relative = path.relative_to(PACKAGE)
    return relative.parts[0].removesuffix(".py")


def _imported_parts(path: Path) -> set[str]:
    parts = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            if name.startswith("modelfs."):
                parts.add(name.split(".")[1])
    return parts


def layer_violations(root: Path) -> list[str]:
    """Every import of a part from a part that may not import it, as ``file: imports part``."""
    problems = []
    for path in sorted(root.rglob("*.py")):
        if path.name == "__init__.py" and path.parent == root:
            continue
        own = _part(path)
        for imported in sorted(_imported_parts(path) - {own}):
            if imported not in RANK:
                problems.append(f"{path.relative_to(root)}: imports {imported}, not in LAYERS")
            elif own not in RANK or RANK[imported] >= RANK[own]:
                problems.append(f"{path.relative_to(root)}: imports {imported} (not below it)")
    return problems


def test_every_part_of_modelfs_has_a_layer() -> None:
    parts = {_part(path) for path in PACKAGE.rglob("*.py")} - {"__init__"}
    assert parts <= set(RANK), sorted(parts - set(RANK))


def test_imports_only_run_downhill() -> None:
    assert layer_violations(PACKAGE) == []


@pytest.mark.parametrize(
    ("source", "found"),
    [
        ("from modelfs.mount.session import serve\n", "cache/bad.py: imports mount (not below it)"),
        ("import modelfs.artifact.tree\n", None),
        ("from modelfs.builder import build\n", "metrics/bad.py: imports builder (not below it)"),
    ],
)
def test_an_uphill_import_is_found(tmp_path: Path, source: str, found: str | None) -> None:
    package = "metrics" if "builder" in source else "cache"
    (tmp_path / package).mkdir()
    (tmp_path / package / "bad.py").write_text(source)
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path
    try:
        assert layer_violations(tmp_path) == ([] if found is None else [found])
    finally:
        PACKAGE = saved
