"""The layout rules of udi/, udi_kernels/ and benchmarks/ (CONTRIBUTING.md), read from the source: no module over
400 lines, no function over 60, no import circle between modules, and the network knows no loss."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("udi", "udi_kernels", "benchmarks")
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 60


def modules() -> dict:
    """module name -> path, for every .py file of PACKAGES."""
    found = {}
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    found[dotted[:-len(".__init__")] if dotted.endswith(".__init__") else dotted] = path
    return found


def imported(module: str, path: str, known) -> set:
    """The modules of `known` that `module` imports anywhere in its file (function-level imports included)."""
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            base = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
            submodules = {f"{base}.{alias.name}" for alias in node.names}
            names.update(submodules)
            if node.module:  # `from . import cpu_isa` imports the submodule (its package is being initialised)
                names.add(base)
    return {name for name in names if name in known and name != module}


def cycle(graph: dict):
    """One import circle of `graph` (module -> imported modules) as a list, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for other in sorted(graph[node]):
            if state.get(other) == "open":
                return stack[stack.index(other):] + [other]
            if other not in state:
                found = visit(other)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_circle():
    known = modules()
    graph = {name: imported(name, path, known) for name, path in known.items()}
    assert cycle(graph) is None, " -> ".join(cycle(graph))


def test_the_scan_finds_a_circle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("module, forbidden", [("udi.model", "udi_kernels.losses"),
                                               ("benchmarks.train_step", "udi.train")])
def test_a_layer_does_not_import_what_it_must_not(module, forbidden):
    path = modules()[module]
    names = {node.module for node in ast.walk(ast.parse(open(path).read())) if isinstance(node, ast.ImportFrom)}
    names |= {alias.name for node in ast.walk(ast.parse(open(path).read())) if isinstance(node, ast.Import)
              for alias in node.names}
    assert not any(name == forbidden or name.startswith(forbidden + ".") for name in names if name)


def test_modules_and_functions_are_small():
    too_long = []
    for name, path in modules().items():
        source = open(path).read()
        if source.count("\n") > MAX_MODULE_LINES:
            too_long.append(f"{name}: {source.count(chr(10))} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}.{node.name}: {length} lines")
    assert too_long == []
