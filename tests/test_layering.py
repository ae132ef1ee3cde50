"""The packages depend one way only: normkernels <- server; client and server never on each other;
normserve.tools, the command line and the bench, on everything and nothing on it."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: folder -> the import names its modules must not use
FORBIDDEN = {
    "normkernels": ("normserve",),
    "server": ("normserve.client", "normserve.tools"),
    "client": ("normserve.server", "normserve.tools"),
}


def _imported(path: Path) -> Iterator[str]:
    """Every module name ``path`` imports (``from a import b`` names both ``a`` and ``a.b``)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_packages_import_only_downwards(folder) -> None:
    # A package's __main__ is a program entry (`python -m normserve.server`), never imported by the package.
    modules = [path for path in (ROOT / folder).rglob("*.py") if path.name != "__main__.py"]
    assert modules
    wrong = {
        f"{path.relative_to(ROOT)}: {name}"
        for path in modules
        for name in _imported(path)
        if name.startswith(FORBIDDEN[folder])
    }
    assert not wrong
