"""The package's shape, as docs/ARCHITECTURE.md states it: which sub-package may import
which, no Snakemake inside the package, no torch where the workflow imports, and no
mergekit version string compared outside the release table."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "remerge"

# sub-package (or top-level module) -> the remerge sub-packages it may import
MAY_IMPORT = {
    "errors": set(),
    "lazy": set(),
    "io": {"errors"},
    "hub": {"errors", "io"},
    "merge": {"errors", "lazy", "io"},
    "evaluation": {"errors", "io", "hub"},
    "provenance": {"errors", "io", "hub", "merge", "evaluation"},
    "demo": {"errors", "io", "merge", "evaluation"},
    "workflow": {"errors", "io", "merge"},
    "stages": {"errors", "io", "hub", "merge", "provenance"},
}


def part_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE).parts
    return rel[0] if len(rel) > 1 else rel[0].removesuffix(".py")


def imported(path: Path) -> set[str]:
    """The remerge sub-packages a module imports (anywhere in it, lazy imports included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("remerge."):
            out.add(node.module.split(".")[1])
        elif isinstance(node, ast.ImportFrom) and node.module == "remerge":
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("remerge."))
    return out


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if part_of(p) in MAY_IMPORT)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_follow_the_layers(path):
    me = part_of(path)
    extra = imported(path) - MAY_IMPORT[me] - {me, "__version__"}
    assert not extra, f"{path.relative_to(ROOT)} imports {sorted(extra)}; {me} may import {sorted(MAY_IMPORT[me])}"


def test_every_sub_package_is_in_the_table():
    parts = {part_of(p) for p in PACKAGE.rglob("*.py")} - {"__init__", "__main__", "cli", "commands"}
    assert parts == set(MAY_IMPORT)


def test_the_package_never_imports_snakemake():
    for path in PACKAGE.rglob("*.py"):
        assert not re.search(r"^\s*(import|from) snakemake", path.read_text(), re.M), path


def test_no_version_string_compared_outside_the_release_table():
    compare = re.compile(r"""(==|!=|\bin\b|startswith\()\s*\(?["']0\.[0-9]""")
    for path in PACKAGE.rglob("*.py"):
        if path.name == "releases.py":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            assert not compare.search(line), f"{path.relative_to(ROOT)}:{i}: {line.strip()}"


def test_what_the_workflow_imports_needs_no_torch():
    """The Snakefile validates recipes, and the plan, assemble and card jobs run, without
    paying for torch (seconds per process)."""
    code = ("import sys; import remerge.workflow.config, remerge.workflow.paths, remerge.stages, "
            "remerge.merge.plan, remerge.merge.tensor, remerge.merge.methods, remerge.provenance.card; "
            "print(sorted(m for m in ('torch', 'transformers', 'lm_eval', 'snakemake') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
