"""Static import graph of a package under ``src/``, for checking layering and import cycles.

Pure stdlib: files are parsed with ``ast``, never imported. Every ``import``/``from`` statement
counts wherever it sits (module level, inside a function, under ``if TYPE_CHECKING:``).
A module is a dotted name (``pkg/fam/__init__.py`` is ``pkg.fam``); its unit is the first
component under the package (``calib`` for ``slimtune.calib.pipeline``, ``cli`` for
``slimtune/cli.py``), and the root package's own ``__init__.py`` is the unit ``ROOT_UNIT``.
"""
import ast
from dataclasses import dataclass
from pathlib import Path

ROOT_UNIT = "__init__"
MISSING_LAYER_HINT = "add it to LAYERS in tests/test_layering.py"


@dataclass(frozen=True)
class _SourceModule:
    name: str
    path: Path
    is_package: bool  # an __init__.py: relative imports resolve against the module itself


def _source_modules(src_dir: Path, package: str) -> list[_SourceModule]:
    root = Path(src_dir) / package
    found = []
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        is_package = parts[-1] == "__init__"
        found.append(_SourceModule(".".join(parts[:-1] if is_package else parts), path, is_package))
    return found


def _resolve_relative(module: _SourceModule, level: int, name: str | None) -> str | None:
    """The absolute name of ``from <level dots><name> import ...``; None if it leaves the tree."""
    parts = module.name.split(".") if module.is_package else module.name.split(".")[:-1]
    if level - 1 >= len(parts):
        return None
    return ".".join(parts[: len(parts) - (level - 1)] + ([name] if name else []))


def _raw_targets(tree: ast.AST, module: _SourceModule, known: set[str]) -> set[str]:
    targets = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            level, name = node.level, node.module
            base = name if level == 0 else _resolve_relative(module, level, name)
            if base is None:
                continue
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                targets.add(submodule if submodule in known else base)
    return targets


def _longest_known_prefix(name: str, known: set[str]) -> str | None:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def module_imports(src_dir: Path, package: str) -> dict[str, set[str]]:
    """Map every module of ``src_dir/package`` to the modules of the same package it imports.

    Imports outside the package are dropped, as are self-imports; a target that is not a module
    in the tree (a typo, or a name imported with ``import a.b.name``) maps to its longest known
    prefix module. Raises SyntaxError for a file that does not parse.
    """
    modules = _source_modules(src_dir, package)
    known = {m.name for m in modules}
    graph: dict[str, set[str]] = {}
    for module in modules:
        tree = ast.parse(module.path.read_text(encoding="utf-8"), filename=str(module.path))
        edges = set()
        for target in _raw_targets(tree, module, known):
            if target == package or target.startswith(package + "."):
                edges.add(_longest_known_prefix(target, known))
        graph[module.name] = edges - {None, module.name}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (iterative Tarjan), each sorted."""
    index: dict[str, int] = {}
    lowlink: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    work: list[tuple[str, object]] = []

    def visit(node: str) -> None:
        index[node] = lowlink[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        work.append((node, iter(sorted(graph.get(node, ())))))

    for start in sorted(set(graph) | {t for targets in graph.values() for t in targets}):
        if start in index:
            continue
        visit(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:  # propagate to the parent
                    lowlink[work[-1][0]] = min(lowlink[work[-1][0]], lowlink[node])
                if lowlink[node] == index[node]:
                    component = stack[stack.index(node) :]
                    del stack[stack.index(node) :]
                    on_stack.difference_update(component)
                    if len(component) > 1:
                        components.append(sorted(component))
            elif child not in index:
                visit(child)
            elif child in on_stack:
                lowlink[node] = min(lowlink[node], index[child])
    return sorted(components)


def unit_of(module: str, package: str) -> str:
    """``slimtune.calib.pipeline`` -> ``calib``; the root package itself -> ``ROOT_UNIT``."""
    return ROOT_UNIT if module == package else module[len(package) + 1 :].split(".")[0]


def unit_graph(graph: dict[str, set[str]], package: str) -> dict[str, set[str]]:
    """The module graph collapsed to units, without self-edges."""
    units: dict[str, set[str]] = {}
    for module, targets in graph.items():
        source = unit_of(module, package)
        edges = units.setdefault(source, set())
        for target in targets:
            target_unit = unit_of(target, package)
            units.setdefault(target_unit, set())
            if target_unit != source:
                edges.add(target_unit)
    return units


def _example_cycle(graph: dict[str, set[str]], members: list[str]) -> list[str]:
    """A shortest path members[0] -> ... -> members[0] inside the component (breadth first)."""
    start, allowed = members[0], set(members)
    paths, frontier = {start: [start]}, [start]
    while frontier:
        node = frontier.pop(0)
        for child in sorted(graph.get(node, ())):
            if child == start:
                return [*paths[node], start]
            if child in allowed and child not in paths:
                paths[child] = [*paths[node], child]
                frontier.append(child)
    return members


def _witness(graph: dict[str, set[str]], package: str, source: str, target: str) -> str:
    """One module import behind the unit edge source -> target."""
    for module in sorted(m for m in graph if unit_of(m, package) == source):
        for imported in sorted(t for t in graph[module] if unit_of(t, package) == target):
            return f"{module} imports {imported}"
    return f"{source} -> {target}"


def layer_violations(graph: dict[str, set[str]], package: str, layers: dict[str, int]) -> list[str]:
    """One line per import of a higher layer, plus one per module whose unit has no layer."""
    problems = []
    for module in sorted(graph):
        unit = unit_of(module, package)
        if unit not in layers:
            problems.append(f"{module}: unit {unit!r} has no layer; {MISSING_LAYER_HINT}")
            continue
        for target in sorted(graph[module]):
            target_unit = unit_of(target, package)
            # an unassigned target unit is reported on its own modules' lines
            if target_unit in layers and layers[target_unit] > layers[unit]:
                problems.append(
                    f"{module} imports {target}: layer {layers[unit]} ({unit})"
                    f" -> layer {layers[target_unit]} ({target_unit})"
                )
    return problems


def dangling_imports(src_dir: Path, package: str) -> list[str]:
    """One line per import of a ``package`` module that does not exist in the tree."""
    modules = _source_modules(src_dir, package)
    known = {m.name for m in modules}
    inside = (lambda name: name == package or name.startswith(package + "."))
    problems = []
    for module in modules:
        for node in ast.walk(ast.parse(module.path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = (node.module if node.level == 0
                        else _resolve_relative(module, node.level, node.module))
                names = [] if base is None else [base]
            else:
                continue
            problems.extend(f"{module.name} imports {name}, which is not a module of {package}"
                            for name in names if inside(name) and name not in known)
    return sorted(set(problems))


def check(src_dir: Path, package: str, layers: dict[str, int]) -> list[str]:
    """All problems: missing modules, module cycles, unit cycles, then layer violations. Empty
    means fine."""
    graph = module_imports(src_dir, package)
    problems = dangling_imports(src_dir, package)
    for members in find_cycles(graph):
        path = " -> ".join(_example_cycle(graph, members))
        problems.append(f"module cycle among {', '.join(members)} (e.g. {path})")
    units = unit_graph(graph, package)
    for members in find_cycles(units):
        path = _example_cycle(units, members)
        witnesses = "; ".join(_witness(graph, package, a, b) for a, b in zip(path, path[1:]))
        problems.append(f"unit cycle among {', '.join(members)}: {' -> '.join(path)} ({witnesses})")
    problems.extend(layer_violations(graph, package, layers))
    return problems
