"""The layering that docs/architecture.md describes, checked on the source (nothing is imported).

* the core (consistentid_core) imports nothing of ComfyUI and nothing of the layers built on it;
* node modules import the core and nodes/glue, never each other (nodes/extension.py registers them all);
* no import cycle anywhere in the pack, training, tools or benchmarks (function-level imports count;
  imports under ``if TYPE_CHECKING:`` do not, as they never run);
* every core module is used by the product (the node pack or training), not only by tests;
* the files a registry archive ships never import what it leaves out.
"""

from __future__ import annotations

import ast
import os

from comfy_harness import REPO_ROOT

PROJECT_PACKAGES = ("consistentid_core", "nodes", "training", "tools", "benchmarks")
COMFYUI_TOP_LEVELS = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "comfy_config", "folder_paths",
                      "node_helpers", "nodes", "server", "execution", "latent_preview", "app", "utils"}
LAYERS_ABOVE_THE_CORE = {"nodes", "training", "tools", "benchmarks", "tests"}
DEVELOPMENT_PACKAGES = {"tests", "tools", "training", "benchmarks"}


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, REPO_ROOT)[: -len(".py")].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _python_files(*folders: str) -> list[str]:
    found = []
    for folder in folders:
        for root, dirs, files in os.walk(os.path.join(REPO_ROOT, folder)):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            found += [os.path.join(root, name) for name in sorted(files) if name.endswith(".py")]
    return found


def _is_type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _import_nodes(tree: ast.AST):
    """Every import statement that can run: module level and inside functions, not under TYPE_CHECKING."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if _is_type_checking_block(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _imports(path: str, known: set[str]) -> set[str]:
    """Absolute names a file imports: a project module where the name is one (``from pkg import mod``
    counts as importing ``pkg.mod``), else the name as written."""
    module = _module_name(path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    names = set()
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
            continue
        if node.level:
            parts = package.split(".") if package else []
            base_parts = parts[: len(parts) - (node.level - 1)]
            if node.level - 1 > len(parts):  # climbs above the repository: the pack's own root
                base_parts = []
            base = ".".join(base_parts + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        for alias in node.names:
            candidate = f"{base}.{alias.name}" if base else alias.name
            names.add(candidate if candidate in known else base)
    return {name for name in names if name}


def _graph(folders=PROJECT_PACKAGES) -> dict[str, set[str]]:
    files = _python_files(*folders)
    known = {_module_name(path) for path in files}
    return {_module_name(path): {name for name in _imports(path, known) if name in known} for path in files}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module, or a module importing itself (Tarjan)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    counter = [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph[node]:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_cycle_through_three_modules():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert sorted(_cycles(graph)) == [["a", "b", "c"], ["e"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_there_is_no_import_cycle():
    assert _cycles(_graph()) == []


def test_the_core_imports_nothing_from_comfyui_or_the_layers_above_it():
    files = _python_files("consistentid_core")
    known = {_module_name(path) for path in files}
    wrong = {}
    for path in files:
        tops = {name.split(".")[0] for name in _imports(path, known)}
        bad = tops & (COMFYUI_TOP_LEVELS | LAYERS_ABOVE_THE_CORE)
        if bad:
            wrong[_module_name(path)] = sorted(bad)
    assert wrong == {}
    assert len(files) > 20  # the walk saw the sub-packages


def test_node_modules_import_the_core_and_the_glue_never_each_other():
    graph = _graph(("consistentid_core", "nodes"))
    node_modules = {m for m in graph if m.startswith("nodes.") and not m.startswith("nodes.glue")}
    registry = {"nodes.extension", "nodes"}
    wrong = {}
    for module in sorted(node_modules - registry):
        others = {t for t in graph[module] if t in node_modules}
        if others:
            wrong[module] = sorted(others)
    for module in sorted(m for m in graph if m.startswith("nodes.glue")):
        upward = {t for t in graph[module] if t in node_modules}
        if upward:
            wrong[module] = sorted(upward)
    assert wrong == {}
    assert {"nodes.apply", "nodes.encode", "nodes.glue.model_patch"} <= set(graph)


def test_every_core_module_is_used_by_the_node_pack_or_by_training():
    graph = _graph(("consistentid_core", "nodes", "training"))
    roots = ["nodes.extension"] + [m for m in graph if m.startswith("training.")]
    reached, todo = set(), list(roots)
    while todo:
        module = todo.pop()
        if module in reached:
            continue
        reached.add(module)
        todo.extend(graph[module])
    core = {m for m in graph if m.startswith("consistentid_core.") and not m.endswith("__init__")}
    packages = {m.rpartition(".")[0] for m in core} | {"consistentid_core"}
    assert sorted(core - reached - packages) == []


def test_the_node_pack_imports_nothing_the_registry_archive_leaves_out():
    files = [os.path.join(REPO_ROOT, "__init__.py")] + _python_files("nodes", "consistentid_core")
    found = {}
    for path in files:
        if os.path.dirname(path) == REPO_ROOT:  # the pack's own __init__: ``from .nodes.x`` stays inside
            with open(path) as f:
                tree = ast.parse(f.read(), path)
            tops = {(n.module or "").split(".")[0] for n in _import_nodes(tree) if isinstance(n, ast.ImportFrom)}
        else:
            tops = {name.split(".")[0] for name in _imports(path, set())}
        wrong = tops & DEVELOPMENT_PACKAGES
        if wrong:
            found[os.path.relpath(path, REPO_ROOT)] = sorted(wrong)
    assert found == {}
