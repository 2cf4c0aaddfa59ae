"""The layers hold and the import graph has no cycle (tools, not memory: import-linter and grimp)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp
import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

REPO = Path(__file__).resolve().parents[1]


def test_import_linter_contracts_are_kept() -> None:
    """Layers adapters -> runner -> stages -> catalog -> domain -> base; stages independent; no Prefect below."""
    lint = Path(sys.executable).parent / "lint-imports"
    proc = subprocess.run([str(lint)], cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "3 kept, 0 broken" in proc.stdout


def import_cycles(*packages: str) -> list[list[str]]:
    """Groups of modules that import each other in a cycle (strongly connected components of size > 1)."""
    graph = grimp.build_graph(*packages)
    modules = sorted(graph.modules)
    index = {m: i for i, m in enumerate(modules)}
    edges = [(index[m], index[i]) for m in modules for i in graph.find_modules_directly_imported_by(m) if i in index]
    rows, cols = (np.array(x, dtype=np.int64) for x in zip(*edges, strict=True))
    matrix = csr_matrix((np.ones(len(edges)), (rows, cols)), shape=(len(modules), len(modules)))
    _, labels = connected_components(matrix, directed=True, connection="strong")
    groups: dict[int, list[str]] = {}
    for module, label in zip(modules, labels, strict=True):
        groups.setdefault(int(label), []).append(module)
    return [g for g in groups.values() if len(g) > 1]


def test_there_is_no_import_cycle() -> None:
    """Package __init__ modules that import their own submodules (the stage registry) are not cycles of ours:
    grimp records no edge from a submodule to its package unless the submodule imports it."""
    assert import_cycles("lesionflow") == []


def test_the_cycle_finder_finds_a_cycle(tmp_path: Path) -> None:
    pkg = tmp_path / "knot"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from knot import b\n")
    (pkg / "b.py").write_text("from knot import a\n")
    (pkg / "c.py").write_text("from knot import a\n")
    sys.path.insert(0, str(tmp_path))
    try:
        assert import_cycles("knot") == [["knot.a", "knot.b"]]
    finally:
        sys.path.remove(str(tmp_path))
