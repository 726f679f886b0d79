"""The checkout's layout as a user and a dependency see it: no top-level name in the checkout
that a dependency may own (transformers imports Hugging Face's ``kernels``)."""

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The checkout's own top-level importable names; anything else would shadow, from the root, a
# package of that name in site-packages.
OWN_TOP_LEVEL = {"fastmae", "tests", "benchmarks"}


def test_only_own_names_are_importable_from_the_root():
    names = {
        path.stem if path.suffix == ".py" else path.name
        for path in ROOT.iterdir()
        if (path.suffix == ".py" and path.is_file()) or (path / "__init__.py").is_file()
    }
    assert names == OWN_TOP_LEVEL


@pytest.mark.parametrize("where", ["", "tests", "benchmarks"])
def test_import_kernels_does_not_resolve_into_the_checkout(where):
    """``import kernels`` run from the root (as ``python -m pytest`` puts it on sys.path), from
    tests/ or from benchmarks/ finds no module of the checkout: Hugging Face's, or none."""
    code = (
        "import importlib.util as u; s = u.find_spec('kernels'); "
        "print(s and (s.origin or ','.join(s.submodule_search_locations or [])))"
    )
    cwd = ROOT / where
    found = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert str(ROOT) not in found, f"import kernels from {cwd} resolves into the checkout: {found}"


def module_imports(path: pathlib.Path, package_root: pathlib.Path) -> set:
    """The fastmae modules one file imports, at any depth of its code (a function's import
    counts too: it closes a cycle at run time)."""
    name = ".".join(path.relative_to(package_root.parent).with_suffix("").parts)
    name = name.removesuffix(".__init__")
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {module for module in found if module.split(".")[0] == "fastmae"}


def import_graph() -> dict:
    package_root = ROOT / "fastmae"
    modules = {}
    for path in package_root.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = module_imports(path, package_root)
    # Keep only edges to modules (``from fastmae import x`` names module fastmae.x, or a
    # name defined in fastmae/__init__.py), and not a package's edge to its own submodules.
    return {
        name: {
            target
            for target in targets
            if target in modules and target != name and not target.startswith(name + ".")
        }
        for name, targets in modules.items()
    }


def find_cycle(graph: dict):
    """One import cycle as a list of modules, or None (a depth-first search)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return stack[stack.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert {"fastmae._unchecked", "fastmae.naive", "fastmae.kernels.loss"} <= graph.keys()
    assert "fastmae.naive" in graph["fastmae._unchecked"]  # the reader sees real edges
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
