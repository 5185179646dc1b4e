"""The code keeps a readable shape (issue #26): batching/scheduler.py stays the scheduler's front door (under
SCHEDULER_MAX_LINES lines), no class in a checked package runs over CLASS_MAX_LINES lines and no function over
FUNCTION_MAX_LINES (from `def` to its last line, docstring included, read with ast); and no test module imports
another one (shared pieces live in testing/ or in a conftest fixture, never imported by name)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCHEDULER_MAX_LINES = 350
CLASS_MAX_LINES = 300
FUNCTION_MAX_LINES = 50
# Packages whose functions and classes are held to the limits.
CHECKED_PACKAGES = ("batching", "server")
# Flat declarations the limits except (issue #26): one list of metrics, one reader of every config variable.
FLAT_DECLARATIONS = {("server/metrics.py", "__init__"), ("server/config.py", "from_env")}


def too_long(path: Path, *, function_max: int = FUNCTION_MAX_LINES, class_max: int = CLASS_MAX_LINES) -> list[str]:
    """The functions and classes of one source file over their limits, as "path:line name (n lines)"."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            limit = function_max
        elif isinstance(node, ast.ClassDef):
            limit = class_max
        else:
            continue
        length = node.end_lineno - node.lineno + 1
        flat = (path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else "", node.name) in FLAT_DECLARATIONS
        if length > limit and not flat:
            found.append(f"{path}:{node.lineno} {node.name} ({length} lines, limit {limit})")
    return found


def package_violations(package: Path) -> list[str]:
    return [v for path in sorted(package.rglob("*.py")) for v in too_long(path)]


def test_imports(path: Path) -> list[str]:
    """Imports of another test module in a file under tests/: `tests.` or `tests` itself, any conftest, or a
    relative import (a sibling test module)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                found.append(f"{path}:{node.lineno} relative import from {'.' * node.level}{node.module or ''}")
                continue
            names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "tests" or "conftest" in parts:
                found.append(f"{path}:{node.lineno} imports {name}")
                break
    return found


test_imports.__test__ = False  # a helper, not a test, despite its name


def test_the_scheduler_module_is_a_front_door():
    lines = len((ROOT / "batching" / "scheduler.py").read_text(encoding="utf-8").splitlines())
    assert lines < SCHEDULER_MAX_LINES, f"batching/scheduler.py has {lines} lines (limit: under {SCHEDULER_MAX_LINES})"


@pytest.mark.parametrize("package", CHECKED_PACKAGES)
def test_no_function_or_class_is_too_long(package):
    assert package_violations(ROOT / package) == []


def test_no_test_module_imports_another():
    found = [v for path in sorted((ROOT / "tests").rglob("*.py")) for v in test_imports(path)]
    assert found == [], "a test module imports another (put the shared piece in testing/ or a fixture)"


def test_the_checkers_catch_planted_violations(tmp_path):
    long_body = "\n".join(f"    x{i} = {i}" for i in range(FUNCTION_MAX_LINES))  # def line + 50 = 51 lines
    (tmp_path / "planted.py").write_text(
        f"def too_long():\n{long_body}\n\n\ndef short():\n    return 1\n\n\n"
        "class Big:\n" + "\n".join(f"    a{i} = {i}" for i in range(CLASS_MAX_LINES)) + "\n",
        encoding="utf-8",
    )
    found = package_violations(tmp_path)
    assert len(found) == 2 and "too_long (51 lines" in found[0] and "Big (301 lines" in found[1], found
    (tmp_path / "fine.py").write_text("def f():\n" + "\n".join(["    pass"] * (FUNCTION_MAX_LINES - 1)) + "\n")
    assert too_long(tmp_path / "fine.py") == []  # exactly at the limit is allowed

    planted = tmp_path / "test_planted.py"
    planted.write_text("import os\nfrom tests.batching.test_scheduler import x\nimport tests.conftest\n"
                       "from tests import conftest\nfrom .test_other import y\nfrom testing.fake_engine import Clock\n")
    found = test_imports(planted)
    assert [line.split()[0].rsplit(":", 1)[1] for line in found] == ["2", "3", "4", "5"], found
