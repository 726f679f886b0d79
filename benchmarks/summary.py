"""The summary table after a benchmark run: per group, reference vs fastmae.

Printed by ``benchmarks/conftest.py`` at the end of ``pytest benchmarks/ --benchmark-only``, or
from a saved run: ``python -m benchmarks.summary out.json`` (pytest-benchmark's JSON).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

TARGETS = (
    "Targets (reported, not asserted): each fused op fwd+bwd >= 80% of copy bandwidth, >= 3x the "
    "eager reference, >= 1.3x torch.compile of the reference; training step >= 1.05x the "
    "reference; peak memory <= 0.9x; on the CPU, no group slower than the reference."
)


def implementation(row: dict) -> str:
    """The row's implementation: ``reference``, ``fastmae``, or either with ``+compile``."""
    return row["extra_info"]["impl"]


def summarize(rows: list[dict]) -> str:
    """rows: dicts with ``group``, ``name``, ``median`` (s) and ``extra_info``."""
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    for row in rows:
        groups[row["group"]][implementation(row)] = row
    header = (
        f"{'group':34} {'reference':>11} {'fastmae':>11} {'speedup':>8} {'vs compile':>10} "
        f"{'GB/s':>8} {'% copy':>7} {'peak MB ref':>12} {'peak MB fm':>11}"
    )
    lines = ["", "fastmae benchmark summary (medians, forward+backward)", header, "-" * len(header)]
    device = ""
    for group in sorted(groups):
        impls = groups[group]
        ref, fused = impls.get("reference"), impls.get("fastmae")
        compiled_ref = impls.get("reference+compile")
        if fused is None or ref is None:
            continue
        info = fused["extra_info"]
        device = info.get("device", device)
        speedup = ref["median"] / fused["median"]
        vs_compile = f"{compiled_ref['median'] / fused['median']:.2f}x" if compiled_ref else "-"
        gbps = copy_pct = "-"
        if info.get("bytes"):
            rate = info["bytes"] / fused["median"] / 1e9
            gbps = f"{rate:.0f}"
            if info.get("copy_gbps"):
                copy_pct = f"{100 * rate / info['copy_gbps']:.0f}%"
        lines.append(
            f"{group:34} {ref['median'] * 1e3:>9.3f}ms {fused['median'] * 1e3:>9.3f}ms "
            f"{speedup:>7.2f}x {vs_compile:>10} {gbps:>8} {copy_pct:>7} "
            f"{_peak(ref):>12} {_peak(fused):>11}"
        )
    lines.append(f"device: {device}")
    lines.append(TARGETS)
    return "\n".join(lines)


def _peak(row) -> str:
    peak = row["extra_info"].get("peak_mb")
    return f"{peak:.0f}" if peak is not None else "-"


def rows_from_json(path: str) -> list[dict]:
    with open(path) as f:
        data = json.load(f)
    return [
        dict(
            group=b["group"],
            name=b["name"],
            median=b["stats"]["median"],
            extra_info=b["extra_info"],
        )
        for b in data["benchmarks"]
    ]


if __name__ == "__main__":
    print(summarize(rows_from_json(sys.argv[1])))
