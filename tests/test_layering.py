"""The package's layering, read from the source, as docs/design.md §3 documents it: every module has
a rank (`RANKS`), and every import (module level or inside a function, absolute or relative, an
``importlib.import_module`` / ``__import__`` string, a package's lazy exports) goes to a lower rank
or within its own package; no import cycles; private torch / megatron-core internals only in
platform/ (`bam_megatron.platform.internals`)."""

from __future__ import annotations

import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "bam_megatron"
DESIGN = os.path.join(ROOT, "docs", "design.md")
# The hub of Hugging Face remote code is self-contained on purpose: shipped as plain files.
SHIPPED_ALONE = f"{PACKAGE}.conversion.hf.remote"

RANKS = {
    "version": 0,
    "lazy_compile": 0,  # installed by the package itself: every process defers megatron-core's torch.compile
    "": 1,  # the package itself (bam_megatron/__init__.py: warnings filters, the version)
    "errors": 1,
    "platform": 2,
    "model": 3,
    "data": 4,
    "checkpoint": 5,
    "conversion": 6,
    "evaluation": 6,
    "peft": 6,
    "inference": 6,
    "training": 7,
    "cli": 8,
    "stats": 8,
    "testing": 9,
}
"""Each top-level package or module of bam_megatron -> its rank (docs/design.md §3): a module imports
only modules of a lower rank, or of its own top-level package."""

# Third-party packages whose underscore names are private internals (allowed in platform/ only).
GUARDED = ("torch", "megatron", "transformer_engine", "apex")
# Underscore attributes of the standard library used on purpose, and why.
STANDARD_LIBRARY = {
    "_actions": "argparse has no public list of a parser's flags (training/arguments.py reads its own parser's)",
}


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


def _tree(path: str) -> tuple[ast.Module, set[int]]:
    """The module's syntax tree, and the ids of the nodes under ``if TYPE_CHECKING:`` (only type
    checkers run those)."""
    tree = ast.parse(open(path).read(), path)
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
        for inner in ast.walk(node)
    }
    return tree, typing_only


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module a (possibly relative) ``from ... import`` names."""
    if node.level == 0:
        return node.module or ""
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _import_strings(node: ast.AST) -> list[str]:
    """``importlib.import_module("x")`` and ``__import__("x")``: the module named by a literal string."""
    if not isinstance(node, ast.Call) or not node.args or not isinstance(node.args[0], ast.Constant):
        return []
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
        return [node.args[0].value]
    return []


def imports_of(module: str, path: str, modules: dict[str, str]) -> set[str]:
    """The package modules ``module`` imports, any way the import is written."""
    tree, typing_only = _tree(path)
    is_package = path.endswith("__init__.py")
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, module, is_package)
            # `from pkg import sub` imports the submodule when there is one
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        elif isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "_EXPORTS" for t in node.targets):
            # a package's lazy exports (PEP 562 __getattr__) import these submodules on first use
            targets = [f"{module}.{sub}" for sub in ast.literal_eval(node.value).values()]
        else:
            targets = _import_strings(node)
        for target in targets:
            while target and target not in modules:  # `import bam_megatron.x.y` of a name in x.y
                target = target.rpartition(".")[0]
            if target.startswith(PACKAGE) and target != module:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports."""
    modules = _modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def top(module: str) -> str:
    """'bam_megatron.model.architecture' -> 'model'; 'bam_megatron' -> ''."""
    return module.removeprefix(PACKAGE).removeprefix(".").split(".")[0]


def rank(module: str) -> int:
    """The rank of a module: its top-level package's (`RANKS`)."""
    return RANKS[top(module)]


def reaching_up(graph: dict[str, set[str]]) -> dict[str, list[str]]:
    """Module -> the imports that break the order: into another top-level package of the same or a
    higher rank."""
    bad = {}
    for module, targets in graph.items():
        wrong = sorted(t for t in targets if top(t) != top(module) and rank(t) >= rank(module))
        if wrong:
            bad[module] = wrong
    return bad


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


def private_uses(path: str, defined: set[str]) -> list[str]:
    """Private internals of torch, megatron-core, Transformer Engine or apex that ``path`` uses: an
    underscore module or name imported from them, an underscore attribute of a name imported from
    them, and an underscore attribute (``self._x``, ``super()._x``, ``obj._x``) that no module of
    the package defines (so inherited from, or reaching into, someone else's class)."""
    tree, _ = _tree(path)
    guarded: set[str] = set()  # names bound to a guarded package's module or object
    other_imports: set[str] = set()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                bound = alias.asname or alias.name.split(".")[0]
                if alias.name.split(".")[0] in GUARDED:
                    guarded.add(bound)
                    if any(part.startswith("_") for part in alias.name.split(".")):
                        found.append(f"import {alias.name}")
                else:
                    other_imports.add(bound)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [alias.asname or alias.name for alias in node.names]
            if node.module.split(".")[0] in GUARDED:
                guarded.update(names)
                if any(part.startswith("_") for part in node.module.split(".")):
                    found.append(f"from {node.module} import ...")
                found += [f"from {node.module} import {a.name}" for a in node.names if a.name.startswith("_")]
            else:
                other_imports.update(names)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or not node.attr.startswith("_") or node.attr.startswith("__"):
            continue
        root = node.value
        while isinstance(root, ast.Attribute):
            root = root.value
        if isinstance(root, ast.Name) and root.id in guarded:
            found.append(ast.unparse(node))
        elif isinstance(root, ast.Name) and root.id in other_imports:
            continue  # the standard library's or another package's business
        elif node.attr not in defined and node.attr not in STANDARD_LIBRARY:
            found.append(ast.unparse(node))
    return found


def defined_private_names() -> set[str]:
    """Every underscore name the package defines: functions, methods, classes, attributes it assigns."""
    names = set()
    for path in _modules().values():
        tree, _ = _tree(path)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
    return {name for name in names if name.startswith("_")}


# ----- the graph itself


def test_the_graph_sees_every_kind_of_import(tmp_path):
    graph = import_graph()
    assert f"{PACKAGE}.model.configs" in graph[f"{PACKAGE}.model.architecture"]  # inside a function
    assert f"{PACKAGE}.checkpoint.store" in graph[f"{PACKAGE}.checkpoint"]  # lazy exports
    package = tmp_path / PACKAGE
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "low.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "mod.py").write_text(
        "from .. import low\nfrom . import other\nimport importlib\n"
        f"importlib.import_module('{PACKAGE}.low')\n__import__('{PACKAGE}.sub.other')\n"
    )
    (package / "sub" / "other.py").write_text("")
    modules = {
        f"{PACKAGE}": "",
        f"{PACKAGE}.low": "",
        f"{PACKAGE}.sub": "",
        f"{PACKAGE}.sub.other": "",
        f"{PACKAGE}.sub.mod": "",
    }
    found = imports_of(f"{PACKAGE}.sub.mod", str(package / "sub" / "mod.py"), modules)
    assert found == {f"{PACKAGE}.low", f"{PACKAGE}.sub.other"}


def test_a_cycle_is_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_an_arrow_up_or_sideways_is_found():
    graph = {
        f"{PACKAGE}.model.a": {f"{PACKAGE}.data.b", f"{PACKAGE}.model.c", f"{PACKAGE}.errors"},
        f"{PACKAGE}.evaluation.x": {f"{PACKAGE}.conversion.y"},
    }
    assert reaching_up(graph) == {
        f"{PACKAGE}.model.a": [f"{PACKAGE}.data.b"],
        f"{PACKAGE}.evaluation.x": [f"{PACKAGE}.conversion.y"],
    }


# ----- the package


def test_every_package_and_module_has_a_rank():
    assert {top(module) for module in _modules()} == set(RANKS)


def test_nothing_imports_in_a_circle():
    assert cycles(import_graph()) == []


def test_every_import_goes_down_the_ranks():
    assert reaching_up(import_graph()) == {}


def test_the_documented_order_is_the_rank_table():
    """docs/design.md §3 lists the layers lowest first, each item naming its packages in backquotes."""
    text = open(DESIGN).read()
    section = text[text.index("## 3. Layout") : text.index("## 4.")]
    documented = {}
    for number, item in re.findall(r"^(\d+)\. (.+?)(?=^\d+\. |^\S|\Z)", section, flags=re.M | re.S):
        head = item.split(":")[0]
        for name in re.findall(r"`([a-z_]+)`", head):
            documented[name] = int(number)
    assert documented == {name: r for name, r in RANKS.items() if name and r > 0}  # rank 0: leaves, unnumbered


def test_private_internals_only_in_platform():
    defined = defined_private_names()
    found = {
        module: uses
        for module, path in _modules().items()
        if top(module) != "platform" and not module.startswith(SHIPPED_ALONE)
        for uses in [private_uses(path, defined)]
        if uses
    }
    assert found == {}


def test_a_private_use_is_found(tmp_path):
    path = tmp_path / "m.py"
    path.write_text(
        "import torch\nfrom megatron.core.x import _hidden\nfrom torch.distributed._shard import y\n"
        "import atexit\nclass A(B):\n    def f(self, linear):\n"
        "        atexit._run_exitfuncs()\n        self._mine = 1\n"
        "        return torch._C, linear._tp_group, super()._adjust(), self._mine, parser()._actions\n"
    )
    assert sorted(private_uses(str(path), {"_mine"})) == sorted(
        [
            "from megatron.core.x import _hidden",
            "from torch.distributed._shard import ...",
            "torch._C",
            "linear._tp_group",
            "super()._adjust",
        ]
    )


def test_remote_code_is_self_contained():
    graph = import_graph()
    shipped = [m for m in graph if m == SHIPPED_ALONE or m.startswith(SHIPPED_ALONE + ".")]
    assert shipped and all(graph[module] <= set(shipped) for module in shipped)  # each other's only


def test_the_shipped_remote_code_spells_the_variants_as_the_package_does():
    from bam_megatron.conversion.hf.remote import configuration_bam
    from bam_megatron.model.variants import VARIANTS

    assert sorted(configuration_bam.VARIANTS) == sorted(VARIANTS)


@pytest.mark.parametrize("layer", ["conversion", "evaluation", "peft", "checkpoint", "model", "data", "platform"])
def test_layers_below_training_never_import_it(layer):
    graph = import_graph()
    up = {
        module: sorted(t for t in targets if top(t) in ("training", "cli"))
        for module, targets in graph.items()
        if top(module) == layer
    }
    assert {m: t for m, t in up.items() if t} == {}
