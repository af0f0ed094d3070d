"""The library's shape (docs/design.md, "The house"): packages in a layer order, entry points only in mct.cli.

Checked on the source's module-level imports (ast): no import runs up a layer or sideways on a floor, no cycle
between modules, nothing but mct/cli (and the `python -m` shims) imports mct.cli, the library never imports
experiments/, and data_pipelines/ and pallas_kernels/ import nothing from mct.
"""

import ast
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]
LIBRARY = ("mct", "data_pipelines", "pallas_kernels")
# floors from the bottom; a package may import its own floor's modules only within itself, and any floor below
LAYERS = (
    ("mct.errors",),
    ("mct.config",),
    ("mct.parallel",),
    ("mct.model",),
    ("mct.train",),
    ("mct.run",),
    ("mct.infer", "mct.export", "mct.launch"),
    ("mct.posttrain", "mct.tunnel"),
    ("mct.evaluation",),
    ("mct.cli",),
)
FLOOR = {package: i for i, floor in enumerate(LAYERS) for package in floor}
SHIM_LINES = 8  # a `python -m mct.X` shim: a docstring, one import of mct.cli, the __main__ call


def module_imports(root: pathlib.Path = REPO) -> dict[str, set[str]]:
    """module name -> the project modules it imports at module level (function-local imports excluded)."""
    graph = {}
    for package in LIBRARY:
        for path in (root / package).rglob("*.py"):
            name = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
            targets = set()
            for node in ast.parse(path.read_text()).body:
                if isinstance(node, ast.Import):
                    targets |= {a.name for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    targets |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            graph[name] = {t for t in targets if t.split(".")[0] in (*LIBRARY, "experiments")}
    return {
        name: {t for t in targets if t in graph or t.startswith("experiments")}
        for name, targets in graph.items()
    }


def is_shim(module: str, root: pathlib.Path = REPO) -> bool:
    """A `python -m` entry shim: mct/<name>.py or mct/<package>/__main__.py that only calls into mct.cli."""
    parts = module.split(".")
    path = root.joinpath(*parts).with_suffix(".py")
    shaped = (len(parts) == 2 and module not in FLOOR and parts[1] != "errors") or parts[-1] == "__main__"
    return (
        parts[0] == "mct" and shaped and path.is_file() and len(path.read_text().splitlines()) <= SHIM_LINES
    )


def unit(module: str) -> str:
    """The layered unit of a module: its mct subpackage (or mct.errors), else its top-level package."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "mct" and len(parts) > 1 else parts[0]


def layer_violations(graph: dict[str, set[str]], root: pathlib.Path = REPO) -> list[str]:
    """Every import that breaks the house's rules, as 'importer -> imported: why'."""
    bad = []
    for module, targets in sorted(graph.items()):
        shim = is_shim(module, root)
        if module.startswith("mct.") and unit(module) not in FLOOR and not shim:
            bad.append(f"{module}: in no layer of {sorted(FLOOR)} (or a shim of over {SHIM_LINES} lines)")
        for target in sorted(targets):
            here, there = unit(module), unit(target)
            if target.startswith("experiments"):
                bad.append(f"{module} -> {target}: the library never imports experiments/")
            elif module.split(".")[0] in ("data_pipelines", "pallas_kernels") and there.startswith("mct"):
                bad.append(f"{module} -> {target}: {module.split('.')[0]} imports nothing from mct")
            elif shim:
                if there != "mct.cli":
                    bad.append(f"{module} -> {target}: a shim imports only mct.cli")
            elif there == "mct.cli" and here != "mct.cli":
                bad.append(f"{module} -> {target}: only mct/cli imports mct.cli")
            elif here in FLOOR and there in FLOOR and here != there and FLOOR[there] >= FLOOR[here]:
                bad.append(f"{module} -> {target}: {there} is not below {here}")
    return bad


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


def test_imports_follow_the_layers():
    assert layer_violations(module_imports()) == []


def test_no_import_cycle_between_modules_or_packages():
    graph = module_imports()
    assert find_cycle(graph) is None
    packages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        if not is_shim(module):
            packages.setdefault(unit(module), set()).update(unit(t) for t in targets)
    assert find_cycle({p: t - {p} for p, t in packages.items()}) is None


def test_every_package_says_what_it_is_and_what_it_may_import():
    for package in sorted(p for p in FLOOR if (REPO / p.replace(".", "/")).is_dir()):
        doc = ast.get_docstring(ast.parse((REPO / package.replace(".", "/") / "__init__.py").read_text()))
        assert doc and "import" in doc.lower(), (
            f"{package}/__init__.py needs a docstring naming what it may import"
        )


def test_mct_holds_packages_shims_and_few_modules():
    modules = [p.stem for p in (REPO / "mct").glob("*.py") if p.stem != "__init__"]
    substance = [m for m in modules if not is_shim(f"mct.{m}")]
    assert len(substance) <= 4, substance


def test_the_checks_catch_an_upward_import_a_cycle_and_a_library_import_of_the_cli():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    graph = {
        "mct.model.decoder": {"mct.train.step"},  # up a layer
        "mct.infer.decoding": {"mct.export.hf_layout"},  # sideways on a floor
        "mct.run.init_from": {"mct.cli.common"},  # the library importing the CLI
        "pallas_kernels.api": {"mct.config.model"},
        "mct.train.step": set(),
        "mct.export.hf_layout": set(),
        "mct.cli.common": set(),
        "mct.config.model": set(),
    }
    assert [line.split(":")[0] for line in layer_violations(graph)] == [
        "mct.infer.decoding -> mct.export.hf_layout",
        "mct.model.decoder -> mct.train.step",
        "mct.run.init_from -> mct.cli.common",
        "pallas_kernels.api -> mct.config.model",
    ]
