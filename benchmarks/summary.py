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


ORDER = ("official", "reference", "fastmae")


def implementation(row: dict) -> str:
    """The row's implementation: ``official``, ``reference``, ``fastmae``, or one of the last
    two with ``+compile`` or ``+compile_blocks``."""
    return row["extra_info"]["impl"]


def _sort_key(impl: str):
    base, _, variant = impl.partition("+")
    return (variant, ORDER.index(base) if base in ORDER else len(ORDER))


def speedups(rows: list[dict]) -> dict[str, dict[str, dict]]:
    """group -> impl -> dict(median, vs_reference, vs_official, gbps, copy_pct, peak_mb,
    cold_s); the speedups are the baseline's median over the row's (None without it)."""
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    for row in rows:
        groups[row["group"]][implementation(row)] = row
    table: dict[str, dict[str, dict]] = {}
    for group, impls in sorted(groups.items()):
        table[group] = {}
        for impl in sorted(impls, key=_sort_key):
            row, info = impls[impl], impls[impl]["extra_info"]
            entry = dict(median=row["median"], peak_mb=info.get("peak_mb"))
            entry["cold_s"] = info.get("cold_s")
            for baseline in ("reference", "official"):
                base = impls.get(baseline)
                entry[f"vs_{baseline}"] = base["median"] / row["median"] if base else None
            entry["gbps"] = info["bytes"] / row["median"] / 1e9 if info.get("bytes") else None
            copy = info.get("copy_gbps")
            entry["copy_pct"] = 100 * entry["gbps"] / copy if entry["gbps"] and copy else None
            table[group][impl] = entry
    return table


def _cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def summarize(rows: list[dict]) -> str:
    """rows: dicts with ``group``, ``name``, ``median`` (s) and ``extra_info``."""
    header = (
        f"{'group':34} {'row':26} {'median':>11} {'vs ref':>7} {'vs official':>11} "
        f"{'GB/s':>7} {'% copy':>7} {'peak MB':>8} {'cold s':>7}"
    )
    lines = ["", "fastmae benchmark summary (medians, forward+backward)", header, "-" * len(header)]
    for group, impls in speedups(rows).items():
        for impl, entry in impls.items():
            lines.append(
                f"{group:34} {impl:26} {entry['median'] * 1e3:>9.3f}ms "
                f"{_cell(entry['vs_reference'], '.2f'):>6}x "
                f"{_cell(entry['vs_official'], '.2f'):>10}x "
                f"{_cell(entry['gbps'], '.0f'):>7} {_cell(entry['copy_pct'], '.0f'):>6}% "
                f"{_cell(entry['peak_mb'], '.0f'):>8} {_cell(entry['cold_s'], '.1f'):>7}"
            )
    devices = {row["extra_info"].get("device") for row in rows} - {None}
    lines.append(f"device: {', '.join(sorted(devices))}")
    lines.append(TARGETS)
    return "\n".join(lines)


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
