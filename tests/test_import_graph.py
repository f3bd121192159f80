"""The import graph of popcomp has no cycle.

Every module of the package is found on disk (pkgutil over the package's directories,
recursively, without importing anything, so a module nothing imports is checked too) and its
source parsed (the compiled core ``_C`` is a module without imports). An edge A -> B is an
import statement of a popcomp module B anywhere in A's source: at module level, inside functions
and classes, under ``if TYPE_CHECKING:``. A deferred import is still a dependency (issue 11's
``covariance`` <-> ``prune`` circle was an import inside a function), so it counts.

* Relative imports are resolved against A's package (``from .. import x`` in a submodule).
* ``from P import name`` is an edge to ``P.name`` when that is a module, else to ``P`` itself
  (``from popcomp import kmeans1d`` inside a submodule is an edge to ``popcomp/__init__.py``).
* The implicit import of a module's parent packages (which Python runs before any submodule)
  is not an edge: with it, every package whose ``__init__`` imports its submodules would be a
  cycle.
* ``importlib.import_module`` calls and imports built from strings are not seen.
"""
from __future__ import annotations

import ast
import os
import pkgutil
from pathlib import Path
from typing import Dict, List, Optional, Set

import popcomp


def _modules(name: str, paths) -> Dict[str, Optional[Path]]:
    """module name -> source file of the package `name` and everything under it (None for a
    compiled extension such as popcomp._C: a module without imports to read)."""
    found: Dict[str, Optional[Path]] = {}
    for path in paths:
        init = Path(path) / "__init__.py"
        if init.is_file():
            found[name] = init
        for info in pkgutil.iter_modules([str(path)]):
            sub = f"{name}.{info.name}"
            source = Path(path) / f"{info.name}.py"
            if info.ispkg:
                found.update(_modules(sub, [os.path.join(path, info.name)]))
            else:
                found[sub] = source if source.is_file() else found.get(sub)
    return found


def _resolve(module: str, is_package: bool, level: int, target: Optional[str]) -> str:
    """The absolute name of `from <level dots><target> import ...` written in `module`."""
    if level == 0:
        return target or ""
    package = module if is_package else module.rpartition(".")[0]
    for _ in range(level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{target}" if target else package


def import_graph(root: str, paths) -> Dict[str, Set[str]]:
    """module -> the modules of `root` it imports (see the module docstring for what counts)."""
    mods = _modules(root, paths)
    graph: Dict[str, Set[str]] = {m: set() for m in mods}
    for mod, file in mods.items():
        if file is None:
            continue
        is_package = file.name == "__init__.py"
        for node in ast.walk(ast.parse(file.read_text(), filename=str(file))):
            targets: List[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, is_package, node.level, node.module)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in mods else base)
            for t in targets:
                while t and t not in mods:  # `import popcomp.ops.checks.X` style: its module
                    t = t.rpartition(".")[0]
                if t and (t == root or t.startswith(root + ".")):
                    graph[mod].add(t)
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One cycle [a, b, ..., a] of the directed graph, or None (iterative depth-first search)."""
    WHITE, GREY, BLACK = 0, 1, 2
    color = {v: WHITE for v in graph}
    for start in sorted(graph):
        if color[start] != WHITE:
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        color[start] = GREY
        while stack:
            v, children = stack[-1]
            for w in children:
                if color.get(w, BLACK) == GREY:
                    return path[path.index(w):] + [w]
                if color.get(w) == WHITE:
                    color[w] = GREY
                    stack.append((w, iter(sorted(graph[w]))))
                    path.append(w)
                    break
            else:
                color[v] = BLACK
                stack.pop()
                path.pop()
    return None


def test_popcomp_import_graph_has_no_cycle():
    graph = import_graph("popcomp", popcomp.__path__)  # the sources (and the compiled _C)
    assert {"popcomp", "popcomp.kmeans", "popcomp.ops.checks"} <= set(graph)  # found them
    assert "popcomp.ops.checks" in graph["popcomp.kmeans"]  # and their imports
    assert "popcomp._C" in graph["popcomp._backend"] or popcomp._backend.compiled() is None
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checker_finds_cycles(tmp_path):
    """The checker itself goes red: a cycle through a relative import inside a function, one
    through `from package import name` of the package's __init__, and none in a clean tree."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from . import a\n")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("import os\n")
    graph = import_graph("pkg", [pkg])
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.sub.b"}, "pkg.sub": set(),
                     "pkg.sub.b": set()}
    assert find_cycle(graph) is None

    (pkg / "sub" / "b.py").write_text("def f():\n    from ..a import x\n")
    assert find_cycle(import_graph("pkg", [pkg])) == ["pkg.a", "pkg.sub.b", "pkg.a"]

    (pkg / "sub" / "b.py").write_text("from pkg import something\n")
    assert find_cycle(import_graph("pkg", [pkg])) == ["pkg", "pkg.a", "pkg.sub.b", "pkg"]
