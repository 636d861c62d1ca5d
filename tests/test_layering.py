"""The package layering of DESIGN.md §2 holds: no package imports one above it; only cluster/ imports Ray."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package → packages it must never import
FORBIDDEN = {
    "kvstore": {"workers", "router", "cluster", "ray"},
    "workers": {"router", "cluster", "ray"},
    "router": {"cluster", "ray"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_package_imports_a_package_above_it(package):
    bad = {
        str(path.relative_to(ROOT)): sorted(_imports(path) & FORBIDDEN[package])
        for path in (ROOT / package).rglob("*.py")
        if "proto" not in path.parts
    }
    assert not {k: v for k, v in bad.items() if v}
