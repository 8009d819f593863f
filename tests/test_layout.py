"""The package layout (docs/architecture.md): one `pathguard` import name,
a strict import stack checked by import-linter on an installed copy, no
deferred import of the project's own modules, and small functions."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SOURCE_DIRS = ("pathguard", "detector", "attacks", "service")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A real (non-editable) install of the project, as pip puts it in site-packages."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "--target", str(target), str(REPO)],
                   check=True, capture_output=True, cwd=tmp_path_factory.mktemp("build"))
    return target


def lint_imports(site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--config", str(REPO / "pyproject.toml"), "--no-cache"],
                          cwd=site, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True)


def test_install_adds_only_the_pathguard_import_name(installed):
    names = {p.name for p in installed.iterdir() if not p.name.endswith((".dist-info", ".egg-info"))}
    assert names - {"bin"} == {"pathguard"}, names
    assert {p.name for p in (installed / "pathguard").iterdir() if p.is_dir() and p.name != "__pycache__"} == {
        "detector", "attacks", "service", "jobs"}
    assert (installed / "bin" / "pathguard").is_file()  # the console script


def test_import_contracts_hold(installed):
    result = lint_imports(installed)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_a_back_edge_breaks_the_contracts(installed, tmp_path):
    """The contracts are not vacuous: the library importing the service fails them."""
    site = tmp_path / "site"
    shutil.copytree(installed, site)
    paths = site / "pathguard" / "detector" / "paths.py"
    paths.write_text(paths.read_text() + "\nimport pathguard.service.app  # a back-edge\n")
    result = lint_imports(site)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout and "pathguard.detector.paths -> pathguard.service.app" in result.stdout


def _modules():
    for folder in SOURCE_DIRS:
        yield from sorted((REPO / folder).rglob("*.py"))


def _own_import(node: ast.AST) -> bool:
    if isinstance(node, ast.ImportFrom):
        return node.level > 0 or (node.module or "").split(".")[0] == "pathguard"
    if isinstance(node, ast.Import):
        return any(alias.name.split(".")[0] == "pathguard" for alias in node.names)
    return False


def test_no_deferred_import_of_the_projects_own_modules():
    """Imports of pathguard modules sit at module level, where import-linter
    and a reader see them, never inside a function to dodge a cycle."""
    found = []
    for path in _modules():
        for func in ast.walk(ast.parse(path.read_text())):
            if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found += [f"{path.relative_to(REPO)}:{n.lineno}" for n in ast.walk(func) if _own_import(n)]
    assert not found, found


def test_no_function_over_80_lines():
    long = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 80:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, long


def test_no_generic_top_level_imports_in_the_code():
    """Code imports detector/attacks/service only as pathguard.detector etc."""
    generic = {"detector", "attacks", "service"}
    bad = []
    for path in [*_modules(), *sorted((REPO / "tests").glob("*.py")), *sorted((REPO / "bench").glob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] in generic:
                bad.append(f"{path.relative_to(REPO)}:{node.lineno}")
            elif isinstance(node, ast.Import) and any(a.name.split(".")[0] in generic for a in node.names):
                bad.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not bad, bad
