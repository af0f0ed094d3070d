"""The library's shape: it never imports experiments/, and its modules import each other without cycles."""

import ast
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]
LIBRARY = ("mct", "data_pipelines", "pallas_kernels")


def module_imports() -> dict[str, set[str]]:
    """module name -> the project modules it imports at module level (function-local imports excluded)."""
    graph = {}
    for package in LIBRARY:
        for path in (REPO / package).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            targets = set()
            for node in ast.parse(path.read_text()).body:
                if isinstance(node, ast.Import):
                    targets |= {a.name for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    targets |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            graph[name] = {t for t in targets if t.split(".")[0] in (*LIBRARY, "experiments")}
    return {name: {t for t in targets if t in graph or t.startswith("experiments")} for name, targets in graph.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph as a list of nodes, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, nxt])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_library_never_imports_experiments():
    offenders = {m: sorted(t) for m, t in module_imports().items() if any(x.startswith("experiments") for x in t)}
    assert not offenders


def test_no_import_cycle_between_modules_or_packages():
    graph = module_imports()
    assert find_cycle(graph) is None
    package_names = {path.parent.relative_to(REPO).as_posix().replace("/", ".")
                     for package in LIBRARY for path in (REPO / package).rglob("__init__.py")}  # fmt: skip
    package = lambda module: module if module in package_names else module.rsplit(".", 1)[0]
    packages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        packages.setdefault(package(module), set()).update(package(t) for t in targets)
    packages = {p: t - {p} for p, t in packages.items()}
    assert find_cycle(packages) is None, packages


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
