"""`import rayalign` and `import rayalign.core` stay free of ray, deepspeed and vllm; core is torch-only."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("ray", "deepspeed", "vllm")


@pytest.mark.parametrize(
    "module",
    ["rayalign", "rayalign.core", "rayalign.core.losses", "rayalign.core.logprobs", "rayalign.core.metrics",
     "rayalign.config_loader", "rayalign.cli", "rayalign.data", "rayalign.models", "rayalign.tiny"],
)
def test_import_does_not_pull_heavy_stacks(module):
    code = (
        f"import sys, {module}\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r} or m.split('.')[0] == 'trl')\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert result.stdout.strip() == "", f"{module} imported {result.stdout.strip()}"


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_core_imports_only_torch_and_the_standard_library():
    allowed = set(sys.stdlib_module_names) | {"torch", "rayalign", "__future__"}
    for path in sorted((REPO / "rayalign" / "core").glob("*.py")):
        extra = _imported_roots(path) - allowed
        assert not extra, f"{path.name} imports {sorted(extra)}"


def test_nothing_in_the_package_imports_trl():
    for path in sorted((REPO / "rayalign").rglob("*.py")):
        assert "trl" not in _imported_roots(path), f"{path} imports trl (tests only)"
