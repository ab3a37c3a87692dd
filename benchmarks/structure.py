"""The structure figures of a package: modules and lines, import floors and cycles, long functions.

``python benchmarks/structure.py [converter/fusion]`` prints, for the package folder given:

* how many modules, and how many lines (the largest modules named);
* the import graph among its modules (every ``import``/``from`` of a module of the package,
  ``TYPE_CHECKING`` imports included: they are a cycle a reader has to untangle too): its
  *floors* (the longest chain of imports, a module importing nothing of the package on floor 1),
  and every cycle;
* imports that point *up* (``core`` importing ``linear``, ``linear`` importing ``conv``, a part
  importing ``engine`` or ``passes``), when the package has the parts ``core`` < ``linear`` <
  ``conv``; and, for information, the imports of a part down into another one than ``core``;
* functions over 40 and over 60 lines;
* the classes that carry "not merged, because" (a dataclass with a ``reason: str`` field).
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
# Which part may import which: a part reads itself and the parts below it; engine and passes
# (the top level) read all of them.
_RANK = {"core": 0, "linear": 1, "conv": 2}


def _modules(package: Path) -> dict[str, Path]:
    base = package.relative_to(_ROOT).as_posix().replace("/", ".")
    found = {}
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package).with_suffix("").as_posix().replace("/", ".")
        name = base if rel == "__init__" else f"{base}.{rel.removesuffix('.__init__')}"
        found[name] = path
    return found


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                if full in modules:
                    out.add(full)
                elif base in modules:
                    out.add(base)
    out.discard(name)
    return out


def _floors(graph: dict[str, set[str]]) -> tuple[dict[str, int], list[list[str]]]:
    """Each module's floor (1 + the highest floor it imports; cycles collapsed) and the cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            components.append(component)

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            connect(v)
    floor: dict[str, int] = {}
    for component in components:  # Tarjan yields them in reverse topological order
        members = set(component)
        below = [floor[w] for v in component for w in graph[v] if w not in members]
        for v in component:
            floor[v] = 1 + max(below, default=0)
    return floor, [sorted(c) for c in components if len(c) > 1]


def _part(module: str, base: str) -> str | None:
    rest = module.removeprefix(base + ".").split(".")
    return rest[0] if len(rest) > 1 and rest[0] in _RANK else None


def _crossings(graph: dict[str, set[str]], base: str) -> tuple[list[str], list[str]]:
    """(imports up a part or into the top level, imports down into a part other than core)."""
    up, down = [], []
    for module, targets in sorted(graph.items()):
        part = _part(module, base)
        if part is None:
            continue  # engine, passes, the package itself: they may read every part
        for target in sorted(targets):
            other = _part(target, base)
            short = f"{module.removeprefix(base + '.')} -> {target.removeprefix(base + '.')}"
            if other is None and target != base:
                up.append(f"{short} (a part importing the top level)")
            elif other is not None and _RANK[other] > _RANK[part]:
                up.append(f"{short} (up a part)")
            elif other not in (None, part, "core"):
                down.append(short)
    return up, down


def _functions(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found.append((node.name, node.end_lineno - node.lineno + 1))
    return found


def _carriers(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if (
                    isinstance(item, ast.AnnAssign)
                    and isinstance(item.target, ast.Name)
                    and item.target.id == "reason"
                ):
                    found.append(node.name)
    return found


def report(package: Path) -> None:
    modules = _modules(package)
    base = package.relative_to(_ROOT).as_posix().replace("/", ".")
    graph = {name: _imports(path, name, modules) for name, path in modules.items()}
    lines = {
        name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in modules.items()
    }
    floor, cycles = _floors(graph)
    print(f"{base}: {len(modules)} modules, {sum(lines.values())} lines")
    for name in sorted(lines, key=lines.get, reverse=True)[:6]:
        print(f"  {lines[name]:5d}  {name.removeprefix(base + '.')}")
    print(f"import floors: {max(floor.values(), default=0)}")
    for n in range(max(floor.values(), default=0), 0, -1):
        names = sorted(m.removeprefix(base + ".") for m in floor if floor[m] == n)
        print(f"  {n:2d}: {' '.join(names)}")
    print(f"import cycles: {len(cycles)}")
    for cycle in cycles:
        print("  " + " <-> ".join(m.removeprefix(base + ".") for m in cycle))
    up, down = _crossings(graph, base)
    print(f"imports up a part (or into the top level): {len(up)}")
    for line in up:
        print("  " + line)
    print(f"imports down into another part than core: {len(down)}")
    for line in down:
        print("  " + line)
    functions = [
        (n, length, name) for name, path in modules.items() for n, length in _functions(path)
    ]
    for limit in (40, 60):
        long = sorted((f for f in functions if f[1] > limit), key=lambda f: -f[1])
        print(f"functions over {limit} lines: {len(long)}")
        for n, length, name in long if limit == 60 else long[:12]:
            print(f"  {length:4d}  {name.removeprefix(base + '.')}.{n}")
    carriers = sorted({c for path in modules.values() for c in _carriers(path)})
    print(f"classes with a 'reason' field: {len(carriers)} ({', '.join(carriers)})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("packages", nargs="*", type=Path, default=[_ROOT / "converter" / "fusion"])
    args = parser.parse_args(argv)
    for package in args.packages:
        report(package.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
