"""genrec's imports flow one way: io/config → data → ops → models → eval → train → api → export/serve/cli.

The test reads every module's source (``ast``), so imports inside functions count as much as top-level ones: a lazy
import still couples two layers and still forms a cycle at run time. It fails on an import from a lower layer into a
higher one, and on any cycle between modules.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "genrec"

# Lower rank = lower layer. A module may import modules of its own rank or lower, never higher.
LAYERS: dict[str, int] = {
    "genrec": 0,  # the package's __init__ (version only)
    "genrec.io": 0,
    "genrec.config": 0,
    "genrec.runtime": 0,
    "genrec.data": 1,
    "genrec.ops": 2,
    "genrec.models": 3,
    "genrec.eval": 4,
    "genrec.train": 5,
    "genrec.api": 6,
    "genrec.ranking_api": 6,
    "genrec.export": 7,
    "genrec.serve": 7,
    "genrec.cli": 8,
    "genrec.__main__": 8,  # ``python -m genrec`` (and ``torchrun -m genrec``): the command line
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def layer_of(name: str) -> int:
    """The rank of the longest LAYERS prefix of ``name``."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in LAYERS:
            return LAYERS[prefix]
    raise AssertionError(f"{name}: no layer declared for it in tests/test_layering.py")


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """genrec modules imported anywhere in ``path`` (top level, functions, TYPE_CHECKING blocks excluded)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    type_checking: set[int] = set()
    for node in ast.walk(tree):  # imports under `if TYPE_CHECKING:` never run: they are annotations only
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            type_checking.update(id(n) for n in ast.walk(node))
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in type_checking:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this module's package
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from genrec.ops import jagged` imports the submodule genrec.ops.jagged
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        out.update(t for t in targets if t == "genrec" or t.startswith("genrec."))
    out.discard(name)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    graph = {}
    for name, path in mods.items():
        deps = set()
        for target in imported_modules(name, path, known):
            while target not in known and "." in target:  # `from genrec.x import name` where name is not a module
                target = target.rsplit(".", 1)[0]
            deps.add(target)
        graph[name] = deps
    return graph


def test_every_module_has_a_layer():
    for name in modules():
        layer_of(name)


def test_no_import_goes_up_a_layer():
    upward = [
        f"{src} (layer {layer_of(src)}) imports {dst} (layer {layer_of(dst)})"
        for src, deps in import_graph().items()
        for dst in sorted(deps)
        if layer_of(dst) > layer_of(src)
    ]
    assert not upward, "imports must flow io/config → data → ops → models → eval → train → api → serve/cli:\n" + "\n".join(upward)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt == "genrec":  # the package __init__ holds only the version: importing it closes no cycle
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_checks_catch_what_they_look_for(tmp_path, monkeypatch):
    """The walker itself: a lazy upward import and a two-module cycle in a throwaway package are both reported."""
    pkg = tmp_path / "genrec"
    (pkg / "ops").mkdir(parents=True)
    (pkg / "models").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "ops" / "__init__.py").write_text("")
    (pkg / "models" / "__init__.py").write_text("")
    (pkg / "ops" / "fast.py").write_text("def f():\n    from genrec.models.net import g\n    return g\n")
    (pkg / "models" / "net.py").write_text("from genrec.ops import fast\n\ndef g():\n    return fast\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE_DIR", pkg)
    graph = import_graph()
    assert graph["genrec.ops.fast"] == {"genrec.models.net"}
    assert graph["genrec.models.net"] == {"genrec.ops.fast"}
    with pytest.raises(AssertionError, match="genrec.ops.fast .layer 2. imports genrec.models.net"):
        test_no_import_goes_up_a_layer()
    assert find_cycle(graph) in (
        ["genrec.models.net", "genrec.ops.fast", "genrec.models.net"],
        ["genrec.ops.fast", "genrec.models.net", "genrec.ops.fast"],
    )
