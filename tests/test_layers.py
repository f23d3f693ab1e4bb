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
    assert _offenders(sorted((SRC / "apps").rglob("*.py")), ("carv.bench", "carv.cli")) == []


def test_library_layers_never_import_apps_bench_or_cli():
    lower = [p for p in sorted(SRC.rglob("*.py")) if p.relative_to(SRC).parts[0] not in ("apps", "bench", "cli.py",
                                                                                           "__main__.py")]
    assert lower, "no library modules found"
    assert _offenders(lower, UPPER) == []


def test_bench_never_imports_cli():
    assert _offenders(sorted((SRC / "bench").rglob("*.py")), ("carv.cli",)) == []


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _package_of(module: str) -> str:
    """The package a module belongs to (a package's ``__init__`` belongs to the package itself)."""
    return module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]


def _carv_imports(module: str) -> list[tuple[str, str | None]]:
    """``(imported module, imported name or None)`` for every import of a carv module in ``module``, deferred
    (function-level) imports included: a cycle that works only because one side defers its import is a cycle."""
    found = []
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, None) for a in node.names if a.name.split(".")[0] == "carv"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "carv":
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.append((sub, None) if sub in MODULES else (node.module, a.name))
    return found


def _import_graph() -> dict[str, set[str]]:
    return {m: {t for t, _ in _carv_imports(m) if t in MODULES and t != m} for m in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_carv():
    assert len(MODULES) > 20
    assert _cycles(_import_graph()) == []


def test_no_private_name_is_imported_from_another_package():
    """``from carv.x.y import _name`` only inside the package that owns ``_name`` (private modules of the top-level
    package, such as ``carv._runfolder``, are carv's own shared helpers and may be imported anywhere)."""
    offenders = sorted(f"{m} imports {name} from {target}" for m in MODULES for target, name in _carv_imports(m)
                       if name is not None and name.startswith("_") and not name.startswith("__")
                       and target in MODULES and _package_of(m) != _package_of(target))
    assert offenders == []


def _function_lengths(path: Path) -> list[tuple[str, int]]:
    """``(name, lines)`` of every function (nested ones too) in a file: from ``def`` to its last line, less its
    docstring."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value,
                                                                                                      str):
                n -= first.end_lineno - first.lineno + 1
            where = path.relative_to(SRC) if path.is_relative_to(SRC) else path.name
            out.append((f"{where}:{node.lineno} {node.name}", n))
    return out


def test_function_length_counts_lines_without_the_docstring(tmp_path):
    f = tmp_path / "m.py"
    f.write_text('def f():\n    """Doc\n    more."""\n    a = 1\n    return a\n\n\ndef g():\n    return 2\n')
    assert [n for _, n in _function_lengths(f)] == [3, 2]


def test_no_function_in_apps_or_bench_is_longer_than_60_lines():
    """A long function in the pipelines or the benchmarks is a missing piece below (DESIGN.md section 3)."""
    files = sorted((SRC / "apps").rglob("*.py")) + sorted((SRC / "bench").rglob("*.py"))
    assert len(files) > 10
    assert [(name, n) for f in files for name, n in _function_lengths(f) if n > 60] == []
