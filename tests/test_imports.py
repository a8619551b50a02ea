"""`import rayalign` and `import rayalign.core` stay free of ray, deepspeed and vllm; core is torch-only."""

from __future__ import annotations

import json
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


ROOTS = """
import ast, json, sys
roots = {}
for path in sys.argv[1:]:
    found = roots.setdefault(path, [])
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found += [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.append(node.module.split(".")[0])
print(json.dumps(roots))
"""


def _imported_roots(paths: list[Path]) -> dict[Path, set[str]]:
    """The top-level packages each file imports (absolute imports). Parsed in a subprocess: CPython 3.11.7's
    `ast.parse` fails ("AST constructor recursion depth mismatch") when another thread of this process
    parses at the same time, and the suite's in-process Ray leaves such threads behind."""
    result = subprocess.run([sys.executable, "-c", ROOTS, *map(str, paths)], capture_output=True, text=True,
                            check=True)
    return {Path(path): set(roots) for path, roots in json.loads(result.stdout).items()}


def test_core_imports_only_torch_and_the_standard_library():
    allowed = set(sys.stdlib_module_names) | {"torch", "rayalign", "__future__"}
    for path, roots in _imported_roots(sorted((REPO / "rayalign" / "core").glob("*.py"))).items():
        extra = roots - allowed
        assert not extra, f"{path.name} imports {sorted(extra)}"


def test_nothing_in_the_package_imports_trl():
    roots = _imported_roots(sorted((REPO / "rayalign").rglob("*.py")))
    assert len(roots) > 50
    for path, imported in roots.items():
        assert "trl" not in imported, f"{path} imports trl (tests only)"
