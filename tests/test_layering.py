"""The package's imports point one way (models <- objectives <- tasks <- train; index,
workdir <- refresh; nothing imports cli), have no cycles, and use no private name of another
module. Read from the source with `ast`: function-level imports count too."""

import ast
import collections
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "realm_jax"

# A module may import modules of a lower layer, or of its own component (package or file)
# when that makes no cycle. Components of one layer never import each other.
LAYERS = [
    ["durable"],
    ["models", "sharding"],
    ["objectives", "config", "hf", "evaluate"],
    ["embedding", "decode"],
    ["data"],
    ["index"],
    ["distributed"],
    ["workdir"],
    ["checkpoints"],
    ["refresh", "tasks", "search"],
    ["train"],
    ["aot", "demo"],
    ["cli"],
]
RANK = {component: rank for rank, names in enumerate(LAYERS) for component in names}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _component(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _resolve(name: str, modules: set[str]) -> str:
    """The module a dotted name refers to: itself, or its longest module prefix (an imported
    attribute such as realm_jax.models.EncoderConfig)."""
    while name not in modules and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _imports(modules: dict[str, ast.Module]):
    """(importer, imported module, imported names or None, line) for every realm_jax import."""
    names = set(modules)
    for module, tree in modules.items():
        package = module if (PACKAGE.parent / module.replace(".", "/") / "__init__.py").exists() \
            else module.rsplit(".", 1)[0]
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("realm_jax"):
                        yield module, _resolve(alias.name, names), None, node.lineno
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                    + ([base] if base else []))
                if not base.startswith("realm_jax"):
                    continue
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    if full in names:  # a module imported from its package
                        yield module, full, None, node.lineno
                    else:
                        yield module, _resolve(base, names), alias.name, node.lineno


@pytest.fixture(scope="module")
def modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(), str(p)) for p in PACKAGE.rglob("*.py")}


def test_every_component_has_a_layer(modules):
    missing = sorted({_component(m) for m in modules} - set(RANK) - {None})
    assert not missing, f"components without a layer in LAYERS: {missing}"


def test_imports_point_down(modules):
    wrong = []
    for importer, imported, _, line in _imports(modules):
        a, b = _component(importer), _component(imported)
        if a is None or b is None or a == b:
            continue
        if RANK[b] >= RANK[a]:
            wrong.append(f"{importer}:{line} imports {imported} ({a} may not import {b})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles(modules):
    graph = collections.defaultdict(set)
    for importer, imported, _, _ in _imports(modules):
        if imported != importer and not importer.startswith(imported + "."):
            graph[importer].add(imported)  # a package's own submodules are not a cycle
    state: dict[str, int] = {}
    cycles = []

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(modules):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)


def test_no_private_names_across_modules(modules):
    wrong = []
    for importer, imported, name, line in _imports(modules):
        if name and name.startswith("_") and imported != importer:
            wrong.append(f"{importer}:{line} imports {imported}.{name}")
    # module._name through a module imported by name
    for module, tree in modules.items():
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("realm_jax"):
                for alias in node.names:
                    if f"{node.module}.{alias.name}" in modules:
                        aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                wrong.append(f"{module}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    assert not wrong, "\n".join(wrong)


def test_layering_check_finds_violations():
    """The checks above can fail: a made-up module that imports upwards, in a cycle and a
    private name is caught by each of them."""
    fake = {
        "realm_jax.models.bad": ast.parse("from realm_jax.train.trainer import _hidden\n"),
        "realm_jax.train.trainer": ast.parse("import realm_jax.models.bad\n"),
    }
    (importer, imported, name, _), *_ = _imports(fake)
    assert (importer, imported, name) == ("realm_jax.models.bad", "realm_jax.train.trainer",
                                          "_hidden")
    with pytest.raises(AssertionError, match="models may not import train"):
        test_imports_point_down(fake)
    with pytest.raises(AssertionError, match="realm_jax.models.bad -> realm_jax.train.trainer"):
        test_no_import_cycles(fake)
    with pytest.raises(AssertionError, match="_hidden"):
        test_no_private_names_across_modules(fake)
