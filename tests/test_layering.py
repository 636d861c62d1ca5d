"""The package layering of DESIGN.md §2 holds: no package imports one above it; only cluster/ imports Ray."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package → packages it must never import
FORBIDDEN = {
    "kvstore": {"workers", "router", "cluster", "ray"},
    "workers": {"router", "cluster", "ray"},
    "router": {"cluster", "ray"},
}


# Parsed in a fresh interpreter: in this one, a thread formatting a traceback can parse at the same time
# (see tests/conftest.py), and CPython 3.11.7's ast.parse then fails with "AST constructor recursion
# depth mismatch".
_SCRIPT = """
import ast, json, sys
out = {}
for name in sys.argv[1:]:
    found = set()
    for node in ast.walk(ast.parse(open(name).read(), filename=name)):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    out[name] = sorted(found)
print(json.dumps(out))
"""


def _imports(paths: list[Path]) -> dict[Path, set[str]]:
    """Top-level packages each file imports (absolute imports only)."""
    done = subprocess.run([sys.executable, "-c", _SCRIPT, *map(str, paths)], capture_output=True, text=True,
                          check=True, timeout=120)
    return {Path(k): set(v) for k, v in json.loads(done.stdout).items()}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_package_imports_a_package_above_it(package):
    paths = [path for path in (ROOT / package).rglob("*.py") if "proto" not in path.parts]
    assert paths
    bad = {str(path.relative_to(ROOT)): sorted(found & FORBIDDEN[package]) for path, found in _imports(paths).items()}
    assert not {k: v for k, v in bad.items() if v}
