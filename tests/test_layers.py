"""Layering (DESIGN.md section 3): dependencies point downwards. Benchmark drivers live in ``bench/`` and
drive the apps' pipelines; an app never imports ``carv.bench``, and nothing below the apps imports either."""

import ast
from pathlib import Path

import carv

SRC = Path(carv.__file__).parent
UPPER = ("carv.apps", "carv.bench", "carv.cli")


def _imports(path: Path) -> set[str]:
    mods = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            mods.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mods.add(node.module)
    return mods


def _offenders(files, forbidden):
    return sorted(f"{p.relative_to(SRC)} imports {m}" for p in files for m in _imports(p)
                  if any(m == f or m.startswith(f + ".") for f in forbidden))


def test_apps_never_import_bench_or_cli():
    assert _offenders(sorted((SRC / "apps").glob("*.py")), ("carv.bench", "carv.cli")) == []


def test_library_layers_never_import_apps_bench_or_cli():
    lower = [p for p in sorted(SRC.rglob("*.py")) if p.relative_to(SRC).parts[0] not in ("apps", "bench", "cli.py",
                                                                                           "__main__.py")]
    assert lower, "no library modules found"
    assert _offenders(lower, UPPER) == []


def test_bench_never_imports_cli():
    assert _offenders(sorted((SRC / "bench").glob("*.py")), ("carv.cli",)) == []
