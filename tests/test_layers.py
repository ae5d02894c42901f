"""The package's layering: each module imports only its own layer or lower ones, with no import cycle.

The layer order is written once, in docs/architecture.md (the ```layers block, bottom layer first), and it names
folders: a module's layer is its folder's (fsdptrain/dist/mesh.py is in the layer that lists `dist`). Top-level
modules (trainer, cli, ...) are named one by one, and a module of a folder that spans layers is named in the layer
above its folder's (memory.trace, a recipe over train.build, sits with the trainer). This test parses the block
and every module's imports (module level and inside functions alike).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.helpers import REPO

PKG = REPO / "fsdptrain"


def layer_order() -> list[tuple[str, list[str]]]:
    text = (REPO / "docs" / "architecture.md").read_text()
    block = re.search(r"```layers\n(.*?)```", text, re.S)
    assert block, "docs/architecture.md has no ```layers block"
    layers = []
    for line in block.group(1).strip().splitlines():
        name, _, modules = line.partition(":")
        layers.append((name.strip(), modules.split()))
    return layers


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[str, list[str]]]:
    """(imported fsdptrain module, imported names) for every import in the file, relative ones resolved."""
    mod = module_name(path)
    package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            names = [a.name for a in node.names]
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                if node.module is None:  # from . import x, y: each is a module
                    found += [(f"{target}.{n}".strip("."), []) for n in names]
                    continue
                found.append((target, names))
            elif node.module and node.module.split(".")[0] == "fsdptrain":
                found.append((node.module.partition(".")[2], names))
        elif isinstance(node, ast.Import):
            found += [(a.name.partition(".")[2], []) for a in node.names if a.name.split(".")[0] == "fsdptrain"]
    return [(t, n) for t, n in found if t]


def layer_of(mod: str, index: dict[str, int]) -> int:
    parts = mod.split(".")
    for i in range(len(parts), 0, -1):  # the longest listed prefix: memory.stats before memory, data.x -> data
        if ".".join(parts[:i]) in index:
            return index[".".join(parts[:i])]
    raise AssertionError(f"fsdptrain.{mod} is in no layer of docs/architecture.md; add it to the ```layers block")


def graph() -> tuple[dict[str, list[tuple[str, list[str]]]], dict[str, int], list[str]]:
    layers = layer_order()
    names = [n for n, _ in layers]
    index = {m: i for i, (_, mods) in enumerate(layers) for m in mods}
    files = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}
    modules = {}
    for mod, path in files.items():  # `from .memory import estimate` imports the module memory.estimate
        deps = []
        for target, imported in imports_of(path):
            subs = [f"{target}.{n}" for n in imported if f"{target}.{n}" in files]
            deps += [(s, []) for s in subs] or [(target, imported)]
        modules[mod] = deps
    return modules, index, names


def folders() -> list[str]:
    return sorted(p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").is_file())


def test_the_layers_name_folders_and_every_folder_is_in_one():
    """Each entry of the block is a folder, a top-level module, or a module of a folder listed in a lower layer
    (a folder spanning layers, said in the block); every folder is listed exactly once."""
    layers = layer_order()
    entries = [m for _, mods in layers for m in mods]
    tops = {p.stem for p in PKG.glob("*.py") if p.name != "__init__.py"}
    dirs = folders()
    assert sorted(e for e in entries if e in dirs) == dirs, "every folder of fsdptrain/ is listed exactly once"
    seen: set[str] = set()
    for _, mods in layers:
        for m in mods:
            head, _, rest = m.partition(".")
            if rest:  # a module listed above its folder's layer
                assert head in seen and (PKG / head / f"{rest}.py").is_file(), f"{m}: not a module of a lower folder"
            else:
                assert m in dirs or m in tops, f"{m}: neither a folder nor a top-level module of fsdptrain/"
        seen.update(mods)
    assert len(dirs) >= 8 and len(tops) <= 6, "the package is organised in folders, with few top-level modules"


def test_every_module_imports_only_its_layer_or_lower():
    modules, index, names = graph()
    upward = []
    for mod, deps in modules.items():
        if mod == "" or mod in folders():  # package __init__ files hold docstrings only
            assert not deps, f"fsdptrain/{mod}/__init__.py imports {deps}; keep package __init__ files empty"
            continue
        mine = layer_of(mod, index)
        for dep, _ in deps:
            theirs = layer_of(dep, index)
            if theirs > mine:
                upward.append(f"{mod} ({names[mine]}) imports {dep} ({names[theirs]})")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_cycle():
    modules, _, _ = graph()
    edges = {m: sorted({d for d, _ in deps if d in modules and d != m}) for m, deps in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for d in edges[m]:
            if state.get(d) == 1:
                cycle = path[path.index(d):] + [d]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        path.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_no_private_name_is_imported_across_modules():
    modules, _, _ = graph()
    private = [f"{mod} imports {dep}.{n}" for mod, deps in modules.items() for dep, names in deps
               for n in names if n.startswith("_") and not n.startswith("__")]
    assert not private, "private names used outside their module:\n" + "\n".join(private)


def test_the_checker_sees_an_upward_import():
    """The parser resolves relative imports: a wing importing the trainer would be caught."""
    deps = dict(imports_of(PKG / "memory" / "tracker.py"))
    assert "dist.distributed" in deps and "memory.stats" in deps and "core.errors" in deps
    index = {m: i for i, (_, mods) in enumerate(layer_order()) for m in mods}
    assert layer_of("trainer", index) > layer_of("memory.tracker", index)
    assert layer_of("data.loader", index) == layer_of("data", index)
    assert layer_of("memory.trace", index) == layer_of("trainer", index) > layer_of("memory.estimate", index)
    assert layer_of("config.schema", index) > layer_of("core.errors", index)


def test_memory_runtime_tools_and_estimator_stay_apart():
    """memory/ holds three jobs; only snapshot.py (the snapshot reader) is shared by the run time and the tools."""
    modules, _, _ = graph()
    parts = {"runtime": {"memory.stats", "memory.tracker"}, "tools": {"memory.report", "memory.diff"},
             "estimator": {"memory.estimate"}}
    part_of = {m: p for p, mods in parts.items() for m in mods}
    crossing = [f"{mod} ({part_of[mod]}) imports {dep} ({part_of[dep]})" for mod, deps in modules.items()
                if mod in part_of for dep, _ in deps if dep in part_of and part_of[dep] != part_of[mod]]
    assert not crossing, "\n".join(crossing)
