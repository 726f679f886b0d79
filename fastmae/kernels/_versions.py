"""The torch and Triton versions fastmae is tested with, checked once at import.

An unsupported version gets one clear message at import rather than a compiler traceback at
the first training step: too old a torch (no ``torch.library.custom_op``) or too old a Triton
for the kernels raises ImportError (the latter unless ``FASTMAE_BACKEND=torch``, which runs
without Triton); a newer release than tested warns once.
"""

from __future__ import annotations

import re
import warnings

from fastmae.config import TESTED_TORCH, TESTED_TRITON


def _minor(version: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def _name(bounds) -> str:
    (low_major, low_minor), (high_major, high_minor) = bounds
    return f"{low_major}.{low_minor}-{high_major}.{high_minor}"


def tested_ranges() -> str:
    return f"torch {_name(TESTED_TORCH)} and Triton {_name(TESTED_TRITON)}"


def check_versions(torch_version: str, triton_version: str | None, backend: str) -> bool:
    """Whether the Triton kernels may be used with these versions. Raises ImportError for
    versions that cannot work, warns for newer ones than tested."""
    found = f"torch {torch_version}" + (
        f" and Triton {triton_version}" if triton_version else " without Triton"
    )
    if _minor(torch_version) < TESTED_TORCH[0]:
        raise ImportError(
            f"fastmae needs torch >= {_name(TESTED_TORCH).split('-')[0]} (its fused ops are "
            f"torch.library custom ops); found {found}. Tested with {tested_ranges()}."
        )
    newer = _minor(torch_version) > TESTED_TORCH[1]
    if triton_version is not None:
        if _minor(triton_version) < TESTED_TRITON[0]:
            if backend == "torch":
                return False
            raise ImportError(
                f"fastmae's Triton kernels need Triton >= {_name(TESTED_TRITON).split('-')[0]}; "
                f"found {found}. Tested with {tested_ranges()}. Install a supported Triton, or "
                "set FASTMAE_BACKEND=torch to run fastmae's torch path without Triton."
            )
        newer = newer or _minor(triton_version) > TESTED_TRITON[1]
    if newer:
        warnings.warn(
            f"fastmae is tested with {tested_ranges()}; found {found}. If a kernel fails to "
            "compile, set FASTMAE_BACKEND=torch and report the versions.",
            stacklevel=3,
        )
    return True
