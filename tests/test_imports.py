"""The import rules of the layout, checked on the source with ``ast`` (nothing is imported):

- the IR (``ghlc/graph.py``) and ``passes/`` import nothing from the runtime;
- ``runtime/`` imports only the IR (``ghlc.graph``, ``ghlc.config``), ``ghlc.errors`` and
  itself, never the ``ghlc`` package's top level;
- the front end uses no private (underscore) name of the runtime;
- ghlc's own modules import each other without cycles (lazy imports inside functions count).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"ghlc": "ghlc", "passes": "ghlc.passes", "runtime": "ghlc.runtime"}
RUNTIME_MAY_IMPORT = {"ghlc.graph", "ghlc.config", "ghlc.errors"}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, pkg in PACKAGES.items():
        for p in sorted((ROOT / folder).glob("*.py")):
            out[pkg if p.stem == "__init__" else f"{pkg}.{p.stem}"] = p
    return out


MODULES = _modules()


def imports(module: str) -> list[tuple[str, tuple[str, ...], int]]:
    """(imported module, names taken from it, line) for each import statement of ``module``;
    ``from pkg import sub`` counts as importing ``pkg.sub`` where that is a module."""
    path = MODULES[module]
    is_pkg = path.stem == "__init__"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, (), node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module if is_pkg else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    pkg = pkg.rpartition(".")[0]
                base = f"{pkg}.{base}" if base else pkg
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append(
                    (sub, (), node.lineno) if sub in MODULES else (base, (a.name,), node.lineno)
                )
    return [i for i in out if i[0] == "ghlc" or i[0].startswith("ghlc.")]


def _where(module: str, line: int) -> str:
    return f"{MODULES[module].relative_to(ROOT)}:{line}"


def test_the_ir_and_the_passes_import_nothing_from_the_runtime():
    ir = ["ghlc.graph"] + [m for m in MODULES if m.startswith("ghlc.passes")]
    bad = [
        f"{_where(m, ln)} imports {dep}"
        for m in ir
        for dep, _, ln in imports(m)
        if dep.startswith("ghlc.runtime")
    ]
    assert bad == []


def test_the_runtime_imports_only_the_ir_and_the_errors():
    bad = [
        f"{_where(m, ln)} imports {dep}"
        for m in MODULES
        if m.startswith("ghlc.runtime")
        for dep, _, ln in imports(m)
        if not dep.startswith("ghlc.runtime") and dep not in RUNTIME_MAY_IMPORT
    ]
    assert bad == []


def private_runtime_names(module: str) -> list[str]:
    """Private runtime names (or modules) that ``module`` imports."""
    return [
        f"{_where(module, ln)} takes {dep}.{n}"
        for dep, names, ln in imports(module)
        if dep.startswith("ghlc.runtime")
        for n in names
        if n.startswith("_")
    ] + [
        f"{_where(module, ln)} imports {dep}"
        for dep, _, ln in imports(module)
        if dep.startswith("ghlc.runtime") and dep.rpartition(".")[2].startswith("_")
    ]


def import_cycles() -> list[str]:
    g = nx.DiGraph()
    g.add_nodes_from(MODULES)
    for m in MODULES:
        g.add_edges_from((m, dep) for dep, _, _ in imports(m) if dep in MODULES and dep != m)
    return sorted(" -> ".join(c + [c[0]]) for c in nx.simple_cycles(g))


def test_the_front_end_takes_no_private_runtime_name():
    front = [m for m in MODULES if not m.startswith(("ghlc.runtime", "ghlc.passes"))]
    assert [bad for m in front for bad in private_runtime_names(m)] == []


def test_ghlc_modules_import_each_other_without_cycles():
    assert import_cycles() == []


@pytest.mark.parametrize(
    "source,found",
    [
        ("from ghlc.runtime.mode import _MHA\n", "takes ghlc.runtime.mode._MHA"),
        ("def f():\n    from .runtime.install import _ATTR\n", "takes ghlc.runtime.install._ATTR"),
        ("from .runtime import _private\n", "takes ghlc.runtime._private"),
    ],
)
def test_the_private_name_check_can_fail(tmp_path, monkeypatch, source, found):
    monkeypatch.setitem(MODULES, "ghlc.front", tmp_path / "front.py")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "front.py").write_text(source)
    assert private_runtime_names("ghlc.front") == [f"front.py:{source.count(chr(10))} {found}"]


def test_the_cycle_check_sees_a_lazy_import(tmp_path, monkeypatch):
    monkeypatch.setitem(MODULES, "ghlc.a", tmp_path / "a.py")
    monkeypatch.setitem(MODULES, "ghlc.b", tmp_path / "b.py")
    (tmp_path / "a.py").write_text("from . import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from .a import x\n")
    assert import_cycles() in (["ghlc.a -> ghlc.b -> ghlc.a"], ["ghlc.b -> ghlc.a -> ghlc.b"])
