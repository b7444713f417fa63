"""qcompile's floors (docs/DESIGN.md, "Layers"): each module imports only its own room and the floors below it, and
no files import each other in a circle. Imports are read from the source with `ast`, wherever they stand: one
inside a function or under `if TYPE_CHECKING:` is a dependency too. (About 1 s.)"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "qcompile"

# lowest first; a floor's rooms do not import each other. A module belongs to the room naming it or its package.
FLOORS = [
    {"numerics": ["qcompile.quant"], "progress bar": ["qcompile.progress"], "model loading": ["qcompile.models"]},
    {"reference ops": ["qcompile.ops"]},
    {"schemes": ["qcompile.schemes"], "kernels": ["qcompile.kernels"]},
    {"options": ["qcompile.options"]},
    {"torch internals": ["qcompile._compat"]},
    {"passes": ["qcompile.passes"]},
    {"released weights": ["qcompile.released"], "calibration": ["qcompile.calibration"],
     "graph keys": ["qcompile.graph_key"], "tensor parallelism": ["qcompile.distributed"]},
    {"backend": ["qcompile.backend"]},
    {"debug": ["qcompile.debug"], "export": ["qcompile.export"], "prepare": ["qcompile.prepare"],
     "per-layer compile": ["qcompile.per_layer", "qcompile.block_views", "qcompile.step_graphs",
                           "qcompile.decode_masks", "qcompile.deferred_stop"]},
    {"entry points": ["qcompile.cli", "qcompile.__main__"]},
]
TOP = "qcompile"  # the package's __init__: the public names, and where the floors are wired together


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported qcompile module, line) for every import statement in the file; `from a import b` names the
    module a.b where there is one, else a (a package's __init__ for a name defined there)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]

    def module_of(dotted: str) -> str:
        while dotted not in known:
            dotted = dotted.rpartition(".")[0]
        return dotted

    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(module_of(a.name), node.lineno) for a in node.names if a.name.split(".")[0] == "qcompile"]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1] + [node.module or ""]).strip(".") \
                if node.level else node.module
            if base.split(".")[0] == "qcompile":
                found += [(f"{base}.{a.name}" if f"{base}.{a.name}" in known else module_of(base), node.lineno)
                          for a in node.names]
    return [(target, line) for target, line in found if target != name]


def graph() -> dict[str, list[tuple[str, int]]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def place(name: str) -> tuple[int, str] | None:
    """(floor, room) of a module, the most specific pattern winning; None for the package's __init__."""
    if name == TOP:
        return None
    best = None
    for floor, rooms in enumerate(FLOORS):
        for room, patterns in rooms.items():
            for p in patterns:
                if (name == p or name.startswith(p + ".")) and (best is None or len(p) > best[0]):
                    best = (len(p), floor, room)
    if best is None:
        raise AssertionError(f"{name} is on no floor: add it to FLOORS in {Path(__file__).name} (and to the "
                             f"picture in docs/DESIGN.md)")
    return best[1], best[2]


def file_of(name: str) -> str:
    return str(modules()[name].relative_to(PACKAGE.parent))


def test_every_import_points_down():
    wrong = []
    for name, targets in graph().items():
        here = place(name)
        for target, line in targets:
            there = place(target)
            if here is None or (there is not None and (there[0] < here[0] or there[1] == here[1])):
                continue
            if there is None:
                why = "the package's __init__, which wires the floors together"
            elif there[0] > here[0]:
                why = f"floor {there[0]} ({there[1]}) is above floor {here[0]} ({here[1]})"
            else:
                why = f"'{there[1]}' and '{here[1]}' are rooms of one floor"
            wrong.append(f"{file_of(name)}:{line} imports {target}: {why}")
    assert not wrong, ("imports that point up or sideways (docs/DESIGN.md, Layers): pass what is needed down as an "
                       "argument, or register it from above\n" + "\n".join(wrong))


def circles(edges: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w, _ in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_no_import_circles():
    found = circles(graph())
    assert not found, "files that import each other in a circle:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_graph_reader_sees_lazy_and_type_only_imports(tmp_path):
    """The check itself: an import inside a function, one under TYPE_CHECKING and a relative one all count."""
    (tmp_path / "qcompile" / "sub").mkdir(parents=True)
    (tmp_path / "qcompile" / "__init__.py").write_text("")
    (tmp_path / "qcompile" / "sub" / "__init__.py").write_text("")
    (tmp_path / "qcompile" / "low.py").write_text("def f():\n    from .sub import high\n")
    (tmp_path / "qcompile" / "sub" / "high.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..low import f\nimport qcompile.sub\n")
    known = {"qcompile": tmp_path / "qcompile/__init__.py", "qcompile.sub": tmp_path / "qcompile/sub/__init__.py",
             "qcompile.low": tmp_path / "qcompile/low.py", "qcompile.sub.high": tmp_path / "qcompile/sub/high.py"}
    edges = {name: imports(name, path, known) for name, path in known.items()}
    assert edges["qcompile.low"] == [("qcompile.sub.high", 2)]
    assert sorted(edges["qcompile.sub.high"]) == [("qcompile.low", 3), ("qcompile.sub", 4)]
    assert circles(edges) == [["qcompile.low", "qcompile.sub.high"]]
