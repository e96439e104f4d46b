"""The import graph of the source packages, and the layering rule it must obey.

Layers, bottom to top: ``models`` < ``inference`` < ``experiments``. A package may import
its own layer and the layers below it, never one above (``benchmarks`` and ``tests`` may
import anything and are not walked). Within one package, modules must not import each other
in a cycle at module level (a cycle through an import inside a function is allowed: it runs
after both modules are initialized).

    python -m benchmarks.import_graph

walks every ``.py`` file of the packages with :mod:`ast` (imports inside functions and
classes included, relative imports resolved), prints the package-to-package edges with
their counts, every upward import and every module-level cycle, and exits with status 1 if
there is any upward import or cycle, else 0. ``tests/test_layering.py`` runs the same check.

An edge goes to the module named: ``from a.b import c`` is an import of ``a.b.c`` when that
is a module of the package, else of ``a.b``. Importing ``a.b.c`` also initializes ``a.b``
first, but that implicit edge is left out: a package's ``__init__`` importing its own
submodules is no cycle. Imports under ``if TYPE_CHECKING:`` count for layering, not for
cycles (they never run).
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent
LAYERS: Tuple[str, ...] = ("models", "inference", "experiments")
"""The source packages, bottom layer first."""


@dataclass(frozen=True)
class Import:
    """One import statement's edge: module ``src`` imports module ``dst``."""

    src: str
    dst: str
    path: str
    line: int
    top_level: bool
    """Runs when ``src`` is imported (module or class body), not inside a function."""
    type_checking: bool = False
    """Under ``if TYPE_CHECKING:``: never runs."""

    @property
    def src_package(self) -> str:
        return self.src.split(".")[0]

    @property
    def dst_package(self) -> str:
        return self.dst.split(".")[0]

    def where(self) -> str:
        kind = "top-level" if self.top_level else "in a function"
        return f"{self.path}:{self.line}: {self.src} imports {self.dst} ({kind})"


def module_files(root: Path = ROOT, packages: Sequence[str] = LAYERS) -> Dict[str, Path]:
    """Module name -> source file of every module of ``packages`` (a package by its ``__init__``)."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _statements(
    nodes: Iterable[ast.AST], top_level: bool, type_checking: bool
) -> Iterator[Tuple[ast.stmt, bool, bool]]:
    """Every import statement under ``nodes`` with whether it runs at import time and whether
    it sits under ``if TYPE_CHECKING:``."""
    for node in nodes:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, top_level, type_checking
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield from _statements(ast.iter_child_nodes(node), False, type_checking)
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _statements(node.body, top_level, True)
            yield from _statements(node.orelse, top_level, type_checking)
        else:  # class bodies, if / try / except / with / for: the timing of their parent
            yield from _statements(ast.iter_child_nodes(node), top_level, type_checking)


def _package_of(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def imports_of(module: str, path: Path, modules: Dict[str, Path], root: Path = ROOT) -> List[Import]:
    """The edges from ``module`` (source ``path``) to modules of the walked packages."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    shown = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
    tops = {m.split(".")[0] for m in modules}
    edges = []
    for node, top_level, type_checking in _statements(tree.body, True, False):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                package = _package_of(module, path).split(".")
                anchor = package[: len(package) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = []
            for alias in node.names:
                sub = f"{base}.{alias.name}" if base else alias.name
                targets.append(sub if sub in modules else base)
        for target in dict.fromkeys(targets):  # one edge per statement and target
            if target.split(".")[0] in tops:
                edges.append(Import(module, target, shown, node.lineno, top_level, type_checking))
    return edges


def collect_imports(root: Path = ROOT, packages: Sequence[str] = LAYERS) -> List[Import]:
    """Every import among the modules of ``packages``, in file order."""
    modules = module_files(root, packages)
    return [edge for module, path in modules.items() for edge in imports_of(module, path, modules, root)]


def upward_imports(imports: Iterable[Import], layers: Sequence[str] = LAYERS) -> List[Import]:
    """The imports of a package from a layer above its own."""
    rank = {package: i for i, package in enumerate(layers)}
    return [
        e
        for e in imports
        if e.src_package in rank and e.dst_package in rank and rank[e.dst_package] > rank[e.src_package]
    ]


def module_cycles(imports: Iterable[Import]) -> List[List[str]]:
    """Cycles of module-level imports between modules of one package: each strongly connected
    component with more than one module (or a module importing itself), sorted."""
    graph: Dict[str, set] = {}
    for e in imports:
        if e.top_level and not e.type_checking and e.src_package == e.dst_package:
            graph.setdefault(e.src, set()).add(e.dst)
            graph.setdefault(e.dst, set())
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: set = set()
    components: List[List[str]] = []

    def connect(v: str) -> None:  # Tarjan's algorithm; the graphs here are small
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return sorted(components)


def cycle_edges(imports: Iterable[Import], cycle: Sequence[str]) -> List[Import]:
    """The module-level imports that close ``cycle``."""
    members = set(cycle)
    return [e for e in imports if e.top_level and not e.type_checking and e.src in members and e.dst in members]


def package_edges(imports: Iterable[Import]) -> Dict[Tuple[str, str], Tuple[int, int]]:
    """(importing package, imported package) -> (number of imports, how many inside functions)."""
    total: Counter = Counter()
    lazy: Counter = Counter()
    for e in imports:
        key = (e.src_package, e.dst_package)
        total[key] += 1
        lazy[key] += not e.top_level
    return {key: (total[key], lazy[key]) for key in sorted(total)}


def report(imports: Sequence[Import], layers: Sequence[str] = LAYERS) -> Tuple[str, bool]:
    """The printed report and whether the graph obeys the rules."""
    rank = {package: i for i, package in enumerate(layers)}
    lines = [f"layers (bottom first): {' < '.join(layers)}", "", "package -> package: imports (inside functions)"]
    for (src, dst), (n, lazy) in package_edges(imports).items():
        flag = "  UPWARD" if rank.get(dst, -1) > rank.get(src, len(layers)) else ""
        lines.append(f"  {src:<12} -> {dst:<12} {n:4d} ({lazy}){flag}")
    upward = upward_imports(imports, layers)
    lines += ["", f"upward imports: {len(upward)}"] + [f"  {e.where()}" for e in upward]
    cycles = module_cycles(imports)
    lines += ["", f"module-level import cycles within a package: {len(cycles)}"]
    for cycle in cycles:
        lines.append(f"  {' <-> '.join(cycle)}")
        lines += [f"    {e.where()}" for e in cycle_edges(imports, cycle)]
    ok = not upward and not cycles
    lines += ["", "OK" if ok else "FAILED: the layering rules are broken (see above)"]
    return "\n".join(lines), ok


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.import_graph", description=__doc__.split("\n")[0])
    p.add_argument("--root", type=Path, default=ROOT, help="the repository root (default: this checkout)")
    args = p.parse_args(argv)
    text, ok = report(collect_imports(args.root))
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
