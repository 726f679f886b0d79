"""The checkout's layout as a user and a dependency see it: no top-level name in the checkout
that a dependency may own (transformers imports Hugging Face's ``kernels``)."""

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
