"""The package's shape: the layers of DESIGN.md hold (import-linter), imports sit at the top of
their module, modules and functions stay small, and Medusa lives in its own package."""

import ast
import shutil
import subprocess
from pathlib import Path

import pytest
from support import REPO

PACKAGE = REPO / "lmkit"
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_MODULE_LINES = 420
MAX_FUNCTION_LINES = 60
# Functions allowed past the limit, and why (none at present).
LONG_FUNCTIONS: set[tuple[str, str]] = set()


def functions(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def test_no_lmkit_import_inside_a_function():
    found = []
    for path in MODULES:
        for function in functions(path):
            for node in ast.walk(function):
                names = (
                    [node.module or ""]
                    if isinstance(node, ast.ImportFrom)
                    else [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else []
                )
                found += [f"{path}:{node.lineno}" for n in names if n.split(".")[0] == "lmkit"]
    assert not found, f"lmkit imports inside functions hide the import graph: {found}"


def test_modules_and_functions_stay_small():
    long_modules = [
        (str(p.relative_to(REPO)), n)
        for p in MODULES
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    ]
    long_functions = [
        (str(p.relative_to(REPO)), f.name, f.end_lineno - f.lineno + 1)
        for p in MODULES
        for f in functions(p)
        if f.end_lineno - f.lineno + 1 > MAX_FUNCTION_LINES
        and (str(p.relative_to(REPO)), f.name) not in LONG_FUNCTIONS
    ]
    assert not long_modules and not long_functions, (long_modules, long_functions)


def test_medusa_is_named_only_in_its_package_and_the_composition_root():
    outside = [
        f"{p.relative_to(REPO)}:{i}"
        for p in MODULES
        if not p.is_relative_to(PACKAGE / "medusa") and not p.is_relative_to(PACKAGE / "run")
        for i, line in enumerate(p.read_text().splitlines(), start=1)
        if "medusa" in line.lower()
    ]
    assert not outside, outside


@pytest.mark.skipif(
    shutil.which("lint-imports") is None,
    reason="import-linter is missing; it runs wherever .[dev] is installed, as in .ci/run",
)
def test_import_layers_hold():
    out = subprocess.run(["lint-imports"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:]
    assert "0 broken" in out.stdout
