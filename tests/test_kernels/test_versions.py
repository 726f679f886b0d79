"""The import-time version check: a clear message for versions outside the tested range."""

import subprocess
import sys
import warnings

import pytest

from fastmae.kernels import _versions
from fastmae.kernels._versions import check_versions


def test_tested_versions_pass_silently():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for torch_version in ("2.4.0", "2.8.1+cu128", "2.13.0+cpu"):
            for triton_version in ("3.0.0", "3.6.0", "3.9.0"):
                assert check_versions(torch_version, triton_version, "auto") is True
        assert check_versions("2.13.0", None, "auto") is True  # no Triton: torch path


def test_too_old_torch_is_refused_with_the_range():
    with pytest.raises(ImportError, match=r"needs torch >= 2.4 .* found torch 2.3.1 and Triton"):
        check_versions("2.3.1", "2.3.1", "torch")


def test_too_old_triton_names_versions_and_suggests_the_torch_backend():
    with pytest.raises(ImportError) as error:
        check_versions("2.6.0", "2.3.1", "auto")
    message = str(error.value)
    assert "found torch 2.6.0 and Triton 2.3.1" in message
    assert "Tested with torch 2.4-2.13 and Triton 3.0-3.9" in message
    assert "FASTMAE_BACKEND=torch" in message
    assert check_versions("2.6.0", "2.3.1", "torch") is False  # runs without the kernels


@pytest.mark.parametrize(
    "torch_version,triton_version", [("2.14.0", "3.9.0"), ("2.13.0", "3.10.0")]
)
def test_newer_than_tested_warns(torch_version, triton_version):
    with pytest.warns(
        UserWarning, match=rf"found torch {torch_version} and Triton {triton_version}"
    ):
        assert check_versions(torch_version, triton_version, "auto") is True


def test_installed_versions_are_in_the_tested_range():
    """CI installs the README's setup: it must be inside the range the README declares."""
    import torch

    triton = pytest.importorskip("triton")
    minor = _versions._minor
    assert _versions.TESTED_TORCH[0] <= minor(torch.__version__) <= _versions.TESTED_TORCH[1]
    assert _versions.TESTED_TRITON[0] <= minor(triton.__version__) <= _versions.TESTED_TRITON[1]


def test_refusal_happens_at_import(tmp_path):
    """A Triton too old for the kernels stops `import fastmae`, not the first training step."""
    fake = tmp_path / "triton"
    (fake / "language").mkdir(parents=True)
    (fake / "__init__.py").write_text("__version__ = '2.3.1'\n")
    (fake / "language" / "__init__.py").write_text("")
    code = "import fastmae"
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin", "FASTMAE_BACKEND": "auto"},
        timeout=300,
    )
    assert done.returncode != 0
    assert "ImportError: fastmae's Triton kernels need Triton >= 3.0" in done.stderr
    assert "FASTMAE_BACKEND=torch" in done.stderr
