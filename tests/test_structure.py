"""The house rules, checked on the source (an AST scan of src/): no import circle, function-level imports
included; no source file over 500 lines."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "napari_virtualstain"
MAX_LINES = 500


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its body (``from . import x`` resolved to modules)."""
    files = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for t in targets:
                if t in files and t != mod:
                    graph[mod].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if n.startswith(m + ".") or m.startswith(n + "."):
                continue  # a package and its own submodules (``__init__`` re-exports) are one room
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (c := visit(n)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_no_import_circle_even_through_function_level_imports():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_scan_finds_a_circle_when_there_is_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_source_file_over_500_lines():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_output_file_names_are_spelled_in_one_place():
    """'_virtualstain.tif', '_labels.tif', ... appear as string literals only in core/io.py (``output_name``)."""
    spellings = ("_virtualstain.tif", "_labels.tif", "_objects.csv", "_uncertainty.tif", "_flags.csv",
                 "_translated.tif", "_control.tif", "_difference.tif", "_samples.tif")
    found = []
    for path in SRC.rglob("*.py"):
        if path == SRC / "core" / "io.py" or path.name == "review.py":  # review files are named by the user
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and not node.value.count(" ") > 3:
                if any(s in node.value for s in spellings):
                    found.append(f"{path.relative_to(SRC)}:{node.lineno}: {node.value!r}")
            elif isinstance(node, ast.JoinedStr):
                text = "".join(v.value for v in node.values if isinstance(v, ast.Constant))
                if text.count(" ") <= 3 and any(s in text for s in spellings):
                    found.append(f"{path.relative_to(SRC)}:{node.lineno}: f-string {text!r}")
    assert not found, "output names spelled outside core/io.py: " + "; ".join(found)


def test_core_imports_neither_the_doors_nor_training_nor_qt():
    """The ground floor stays the ground floor (docs/architecture.md, 'The rooms'): core/ never imports Qt, napari,
    argparse, the CLI, the widgets or train/ — anywhere in a module, function-level imports included."""
    banned_pkgs = ("napari_virtualstain.cli", "napari_virtualstain._widgets", "napari_virtualstain.train")
    banned_libs = ("qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "napari", "argparse", "magicgui")
    graph = import_graph()
    found = []
    for mod, targets in graph.items():
        if mod.startswith("napari_virtualstain.core"):
            found += [f"{mod} -> {t}" for t in targets if t.startswith(banned_pkgs)]
    for path in (SRC / "core").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            found += [f"{path.name} -> {n}" for n in names if n.split(".")[0] in banned_libs]
    assert not found, found
