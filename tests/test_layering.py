"""The package's layering, read from the source: which modules import which (at module level and
inside functions alike), no import cycles, and the layers below the training loop never reach up
into it."""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "bam_megatron"
# The hub of Hugging Face remote code is self-contained on purpose: shipped as plain files.
SHIPPED_ALONE = f"{PACKAGE}.conversion.hf.remote"


def _modules() -> dict[str, str]:
    """Dotted module name -> file, for every module of the package."""
    found = {}
    for directory, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
        for name in files:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(directory, name), ROOT)[: -len(".py")]
                dotted = rel.replace(os.sep, ".")
                found[dotted.removesuffix(".__init__")] = os.path.join(directory, name)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (any import statement anywhere in the file, except
    those under ``if TYPE_CHECKING:``, which only type checkers run)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(open(path).read(), path)
        typing_only = {
            id(inner)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
            for inner in ast.walk(node)
        }
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pkg import sub` imports the submodule when there is one
                targets = [
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                    for a in node.names
                ]
            elif isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "_EXPORTS" for t in node.targets):
                # a package's lazy exports (PEP 562 __getattr__) import these submodules on first use
                targets = [f"{name}.{sub}" for sub in ast.literal_eval(node.value).values()]
            for target in targets:
                if target.startswith(PACKAGE) and target in modules and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return out


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    # bam_megatron.model.architecture imports the builder only inside Architecture.model_config
    assert f"{PACKAGE}.model.builder" in graph[f"{PACKAGE}.model.architecture"]
    assert f"{PACKAGE}.checkpoint.store" in graph[f"{PACKAGE}.checkpoint"]  # lazy exports


def test_a_cycle_is_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_nothing_imports_in_a_circle():
    assert cycles(import_graph()) == []


@pytest.mark.parametrize("layer", ["conversion", "evaluation", "peft", "checkpoint", "model", "data", "platform"])
def test_layers_below_training_never_import_it(layer):
    graph = import_graph()
    reaching_up = {
        module: sorted(t for t in targets if t.startswith(f"{PACKAGE}.training") or t.startswith(f"{PACKAGE}.cli"))
        for module, targets in graph.items()
        if module.startswith(f"{PACKAGE}.{layer}")
    }
    assert {m: t for m, t in reaching_up.items() if t} == {}


def test_remote_code_is_self_contained():
    graph = import_graph()
    shipped = [m for m in graph if m == SHIPPED_ALONE or m.startswith(SHIPPED_ALONE + ".")]
    assert shipped and all(not graph[module] for module in shipped)


def test_the_shipped_remote_code_spells_the_variants_as_the_package_does():
    from bam_megatron.conversion.hf.remote import configuration_bam
    from bam_megatron.model.variants import VARIANTS

    assert sorted(configuration_bam.VARIANTS) == sorted(VARIANTS)
