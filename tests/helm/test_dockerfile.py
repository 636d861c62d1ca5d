"""The Dockerfile, checked without Docker: its instructions parse, what it copies exists, the
context keeps what it copies, the image runs as non-root, and the command it names is the project's."""

from __future__ import annotations

import fnmatch
import re
import shlex
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement

from tests.helm.render import CHART, ROOT

INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER",
                "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        word, _, rest = pending.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    assert not pending, f"dangling continuation: {pending!r}"
    return out


DOCKERFILE = instructions((ROOT / "Dockerfile").read_text())
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _args() -> dict[str, str]:
    return dict(a.split("=", 1) for k, a in DOCKERFILE if k == "ARG" and "=" in a)


def _copies() -> list[list[str]]:
    return [[w for w in shlex.split(a) if not w.startswith("--")] for k, a in DOCKERFILE if k in ("COPY", "ADD")]


def test_instructions_are_known_and_it_starts_from_a_cuda_ray_image():
    assert {k for k, _ in DOCKERFILE} <= INSTRUCTIONS
    kinds = [k for k, _ in DOCKERFILE]
    assert kinds.index("FROM") < min(i for i, k in enumerate(kinds) if k not in ("ARG", "FROM"))
    base = next(a for k, a in DOCKERFILE if k == "FROM")
    for name, value in _args().items():
        base = base.replace(f"${{{name}}}", value)
    assert re.fullmatch(r"rayproject/ray:[0-9.]+-py3[0-9]+-cu[0-9]+", base), base


def test_ray_version_agrees_with_pyproject_and_the_chart():
    version = _args()["RAY_VERSION"]
    ray = next(Requirement(d) for d in PYPROJECT["project"]["dependencies"] if Requirement(d).name == "ray")
    assert ray.specifier.contains(version), (version, str(ray.specifier))
    chart_values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert chart_values["rayVersion"] == version


def test_copied_files_exist_and_the_context_keeps_them():
    ignore = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]

    def kept(path: str) -> bool:  # .dockerignore semantics: the last matching pattern wins
        keep = True
        for pattern in ignore:
            negate = pattern.startswith("!")
            p = pattern.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(path, p) or path.startswith(p + "/"):
                keep = negate
        return keep

    copied = set()
    for words in _copies():
        *sources, _dest = words
        for src in sources:
            assert (ROOT / src).exists(), f"COPY {src}: no such file in the project"
            assert kept(src), f"COPY {src}: excluded by .dockerignore"
            copied.add(src.rstrip("/"))
    packages = {p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= copied, f"packages not copied: {packages - copied}"
    assert {"pyproject.toml", "README.md"} <= copied  # README.md: the package's readme metadata
    assert not kept(".venv") and not kept("tests")


def test_it_installs_the_project_and_runs_its_console_script_as_non_root():
    runs = " ".join(a for k, a in DOCKERFILE if k == "RUN")
    assert re.search(r"pip install (\S+ )*\.(\s|$|\[)", runs), runs
    user = [a for k, a in DOCKERFILE if k == "USER"][-1]
    assert user.split(":")[0] not in ("root", "0")
    kinds = [k for k, _ in DOCKERFILE]
    assert max(i for i, k in enumerate(kinds) if k == "USER") > max(i for i, k in enumerate(kinds) if k == "RUN")
    cmd = next(a for k, a in reversed(DOCKERFILE) if k in ("CMD", "ENTRYPOINT"))
    argv = yaml.safe_load(cmd)  # exec form: a JSON array
    assert isinstance(argv, list) and argv[0] in PYPROJECT["project"]["scripts"], argv
    from cluster.cli import build_parser

    build_parser().parse_args(argv[1:])  # the command line is one the CLI accepts


def test_the_chart_runs_the_image_with_its_user():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    user = [a for k, a in DOCKERFILE if k == "USER"][-1].split(":")
    assert values["podSecurityContext"]["runAsUser"] == int(user[0])
    assert values["podSecurityContext"]["runAsGroup"] == int(user[1])
