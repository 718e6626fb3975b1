"""The package's one-way dependency rule (docs/architecture.md), checked on every module's imports.

A module may import its own subpackage and lower layers, never a higher layer, never a package of
its own layer; function-local imports obey the same rule (they are allowed only to keep optional
dependencies and torch out of start-up, not to reach upwards). ``kvboost_rag.testing`` sits above
everything and the core never imports it nor the benchmark package.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "kvboost_rag"

# Top-level unit (module or subpackage) -> layer.
LAYERS = {
    "errors": 0, "phases": 0, "files": 0, "validate": 0.1, "config": 0.2,
    "kv": 1, "prompt": 1, "models": 1,
    "store": 2, "decode": 2, "blend": 2,
    "prefill": 3, "index": 3,
    "serve": 4,
    "fidelity": 5, "engine": 5.1,
    "frameworks": 6, "app": 6,
    "testing": 7,
}
# Deprecated import paths kept for one release: each only aliases the module that replaced it.
ALIASES = {"disk_store", "warm", "segments", "generate", "sources", "indexing"}
# Same-layer imports that are part of the design: none.
ALLOWED_SAME_LAYER: set[tuple[str, str]] = set()


def _unit(module: str) -> str | None:
    """'kvboost_rag.kv.rope' -> 'kv'; the package root itself -> None."""
    parts = module.split(".")
    if parts[0] != "kvboost_rag" or len(parts) == 1:
        return None
    return parts[1]


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path):
    """(imported module, line, is_local) for every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    local_lines = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for sub in ast.walk(node):
                if isinstance(sub, (ast.Import, ast.ImportFrom)):
                    local_lines.add(sub.lineno)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno, node.lineno in local_lines
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "kvboost_rag" or (node.module is None and node.level):
                # from kvboost_rag import validate / from . import x: the names are modules
                exports = _root_exports() if target == "kvboost_rag" else {}
                for alias in node.names:
                    if alias.name == "__version__" and target == "kvboost_rag":
                        continue  # a constant of the root, no import behind it
                    name = exports.get(alias.name, f"{target}.{alias.name}")
                    yield name, node.lineno, node.lineno in local_lines
            else:
                yield target, node.lineno, node.lineno in local_lines


def _root_exports() -> dict[str, str]:
    """The package root's lazy exports: public name -> the module that defines it."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "_EXPORTS":
            return {k: f"kvboost_rag.{v}" for k, v in ast.literal_eval(node.value).items()}
    raise AssertionError("kvboost_rag/__init__.py has no _EXPORTS")


def _core_modules():
    return sorted(p for p in PACKAGE.rglob("*.py"))


def test_every_unit_has_a_layer():
    units = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in _core_modules()}
    units -= {"__init__"} | ALIASES
    assert units <= set(LAYERS), f"modules without a layer: {sorted(units - set(LAYERS))}"


@pytest.mark.parametrize("path", _core_modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_down_only(path: Path):
    own = _unit(_module_name(path))
    if own is None or own in ALIASES:
        return  # the package root re-exports lazily; aliases point at one module
    own_layer = LAYERS[own]
    bad = []
    for target, line, local in _imports(path):
        if target.startswith("kvboost_rag_bench"):
            bad.append(f"line {line}: imports the benchmark package {target}")
            continue
        unit = _unit(target)
        if unit is None or unit == own:
            continue
        if unit in ALIASES:
            bad.append(f"line {line}: imports the deprecated alias {target}")
            continue
        layer = LAYERS.get(unit)
        if layer is None:
            bad.append(f"line {line}: imports {target}, which has no layer")
        elif layer > own_layer:
            bad.append(f"line {line}: {'local ' if local else ''}import of {target} (layer {layer}) "
                       f"from layer {own_layer}")
        elif layer == own_layer and (own, unit) not in ALLOWED_SAME_LAYER:
            bad.append(f"line {line}: {'local ' if local else ''}import of {target} from its own layer {own_layer}")
    assert not bad, f"{path.relative_to(PACKAGE)}:\n" + "\n".join(bad)


def test_no_import_cycles_between_modules():
    """Module-level imports inside the package form no cycle (function-local ones are checked above)."""
    graph: dict[str, set[str]] = {}
    names = {_module_name(p) for p in _core_modules()}
    for path in _core_modules():
        mod = _module_name(path)
        deps = set()
        for target, _line, local in _imports(path):
            if local:
                continue
            while target and target not in names:
                target = target.rpartition(".")[0]
            if target and target != mod and target != "kvboost_rag":
                deps.add(target)
        graph[mod] = deps
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for dep in graph.get(node, ()):
            if _is_package_of(dep, node):
                continue  # a module importing its own package's __init__ is not a cycle of concern
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep] if dep in stack else [node, dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def _is_package_of(package: str, module: str) -> bool:
    return module.startswith(package + ".")
