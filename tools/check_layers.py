"""The house's order, checked: no import cycle, and no package importing one above it.

    python tools/check_layers.py          # prints what it finds; exit 1 if anything

Every ``import`` in ``moekit/`` counts, those inside functions included (a deferred import
still ties the two modules together). The order is declared once, in ``LAYERS`` below,
lowest first; ../shared/docs/ARCHITECTURE.md draws the same list. A module may import its
own room and any room listed before it.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

# lowest first; one entry per room (a package under moekit/ or a top-level module).
# Rooms on one line are one floor: they may not import each other.
LAYERS: list[tuple[str, ...]] = [
    ("checks", "runtime", "recipe"),     # field checks, process settings, TOML and --set as dicts
    ("data",),
    ("moe",),
    ("model",),
    ("config",),
    ("parallel",),
    ("interop",),
    ("transform",),
    ("store",),                          # the loader applies structures (quantize, LoRA) of transform/
    ("finetune",),                       # freezing, ESFT: applied by the engine's setup
    ("train",),
    ("report",),
    ("serve", "search", "federate"),
    ("cli",),
    ("__main__", "__init__"),            # `python -m moekit`; the package's public names
]
FLOOR = {room: i for i, rooms in enumerate(LAYERS) for room in rooms}


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under ``root`` (the moekit package)."""
    out = {}
    for f in sorted(root.rglob("*.py")):
        parts = list(f.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def room(mod: str) -> str:
    """The room of a module: ``moekit.train.step`` -> ``train``; the package itself -> ``__init__``."""
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(mod: str, path: Path, known: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported moekit module, line) for every import statement in the file."""
    is_pkg = path.name == "__init__.py"
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - (node.level - 1)]
                target = ".".join(anchor + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from a.b import c` names module a.b.c when c is a module, else a.b
            names = [f"{target}.{a.name}" if f"{target}.{a.name}" in known else target
                     for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:        # `import moekit.a.b` where b is a name
                name = name.rpartition(".")[0]
            if name.startswith("moekit") and name != mod:
                found.append((name, node.lineno))
    return found


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components of more than one node (each one an import cycle)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def check(root: Path) -> dict:
    """{"file_cycles", "room_cycles", "upward", "unknown_rooms"} for the package at ``root``."""
    known = modules(root)
    files: dict[str, set[str]] = defaultdict(set)
    rooms: dict[str, set[str]] = defaultdict(set)
    upward, unknown = [], sorted({room(m) for m in known} - set(FLOOR))
    for mod, path in known.items():
        for dep, line in imports(mod, path, known):
            files[mod].add(dep)
            a, b = room(mod), room(dep)
            if a != b:
                rooms[a].add(b)
                if a in FLOOR and b in FLOOR and FLOOR[b] >= FLOOR[a]:
                    upward.append(f"{path}:{line}: {mod} ({a}) imports {dep} ({b})")
    return {"file_cycles": strongly_connected(files), "room_cycles": strongly_connected(rooms),
            "upward": sorted(upward), "unknown_rooms": unknown}


def main() -> int:
    root = Path(__file__).resolve().parent.parent / "moekit"
    found = check(root)
    for cyc in found["file_cycles"]:
        print("import cycle between files: " + " <-> ".join(cyc))
    for cyc in found["room_cycles"]:
        print("import cycle between rooms: " + " <-> ".join(cyc))
    for line in found["upward"]:
        print("upward import: " + line)
    for r in found["unknown_rooms"]:
        print(f"room {r!r} has no place in LAYERS (tools/check_layers.py): add it to the order")
    n = {k: len(v) for k, v in found.items()}
    print(f"{n['file_cycles']} file cycles, {n['room_cycles']} room cycles, "
          f"{n['upward']} upward imports, {n['unknown_rooms']} rooms without a floor")
    return 1 if any(n.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
