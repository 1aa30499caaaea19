"""The planner's import graph: no module climbs back up.

The graph is built from the source with ``ast`` (nothing is imported), one node per module of
``kdplan`` (a package is its ``__init__``), one edge per ``import`` statement, wherever it sits
(a function-level import is a dependency too). Importing ``a.b.c`` also runs ``a/__init__`` and
``a/b/__init__``; those implicit edges are not counted: a package's ``__init__`` re-exporting its
modules is not a cycle with them.
"""

import ast
from pathlib import Path

import networkx as nx
import pytest

PKG = Path(__file__).resolve().parent.parent / "kdplan"


def module_name(path: Path, root: Path = PKG) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = PKG) -> nx.DiGraph:
    """Module -> module edges between the modules under ``root`` (a package directory)."""
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    g = nx.DiGraph()
    g.add_nodes_from(files)

    def target(name: str) -> str | None:
        while name and name not in files:  # ``from kdplan.cost.role import x``: x is not a module
            name = name.rpartition(".")[0]
        return name or None

    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".")[: len(mod.split(".")) - node.level + (1 if is_pkg else 0)]
                    base = ".".join(base + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                names = [f"{base}.{a.name}" for a in node.names]  # a module or a name in ``base``
            else:
                continue
            for n in names:
                t = target(n)
                if t is not None and t != mod:
                    g.add_edge(mod, t)
    return g


GRAPH = import_graph()


def test_the_graph_sees_known_edges():
    """The walker resolves relative, absolute and function-level imports (else the checks below
    would pass on an empty graph)."""
    assert GRAPH.has_edge("kdplan.jobs", "kdplan.pins")  # from .pins import ...
    assert GRAPH.has_edge("kdplan.cost.baselines", "kdplan.cost.compose")  # from .compose import ...
    assert GRAPH.has_edge("kdplan.planner", "kdplan.search.space")  # from .search.space import ...
    assert GRAPH.has_edge("kdplan.cost", "kdplan.cost.prediction")  # a package __init__
    assert GRAPH.has_edge("kdplan.search.mixed", "kdplan.cost.flops")  # inside a function
    assert GRAPH.number_of_edges() > 100


def test_a_cycle_is_found(tmp_path):
    pkg = tmp_path / "kdplan"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .a import f\n")
    (pkg / "sub" / "a.py").write_text("def f():\n    from . import b\n")
    (pkg / "sub" / "b.py").write_text("from ..sub.a import f\n")
    g = import_graph(pkg)
    assert g.has_edge("kdplan.sub.a", "kdplan.sub.b") and g.has_edge("kdplan.sub.b", "kdplan.sub.a")
    assert not nx.is_directed_acyclic_graph(g)


def test_no_import_cycles():
    cycles = list(nx.simple_cycles(GRAPH))
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c + c[:1]) for c in sorted(cycles)[:20])


@pytest.mark.parametrize("low", ["kdplan.cost", "kdplan.sim"])
def test_cost_and_sim_import_neither_jobs_nor_search(low):
    """The cost model and the simulator take a resolved Problem (kdplan.problem); how it was
    resolved (kdplan.jobs) and how the plan is chosen (kdplan.search) are above them."""
    mods = [m for m in GRAPH if m == low or m.startswith(low + ".")]
    bad = [(m, t) for m in mods for t in nx.descendants(GRAPH, m)
           if t in ("kdplan.jobs", "kdplan.planner", "kdplan.whatif") or t.startswith(("kdplan.search", "kdplan.cli"))]
    assert not bad, f"{low} reaches up to: " + ", ".join(f"{m} -> ... -> {t}" for m, t in bad[:10])


def test_the_planner_never_imports_torch():
    top = {n.split(".")[0] for p in PKG.rglob("*.py") for node in ast.walk(ast.parse(p.read_text()))
           for n in ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])}
    assert "torch" not in top and "executor" not in top
