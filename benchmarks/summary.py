"""Benchmark results: the summary table, the results files, and the comparison of two runs.

    pytest benchmarks/ --benchmark-only                       # prints the summary at the end
    pytest benchmarks/ --benchmark-only --fastmae-results benchmarks/results
    python -m benchmarks.summary RUN.json [--write benchmarks/results]
    python -m benchmarks.summary --compare OLD.json NEW.json

``RUN.json`` is pytest-benchmark's ``--benchmark-json`` output or a results file written here.

Every row but the reference is timed paired with the reference (``benchmarks/conftest.py``):
each round runs the reference step right before or right after the row's step, at random, on
the same inputs, so a change of machine load between rounds hits both. A row's speedup is the
median of its per-round ratios (reference time / row time) with a distribution-free 95%
interval for that median (order statistics of the ratios). A speedup is reported as a verdict
only when the interval is narrow enough to decide; otherwise the row says ``too wide to
conclude``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
from collections import defaultdict

TARGETS = (
    "Targets (reported, not asserted): each fused op fwd+bwd >= 80% of copy bandwidth, >= 3x the "
    "eager reference, >= 1.3x torch.compile of the reference; training step >= 1.05x the "
    "reference; peak memory <= 0.9x; on the CPU, no group slower than the reference."
)
ORDER = ("official", "reference", "fastmae")
# An interval whose ends differ by more than this factor cannot tell a speedup from noise.
WIDEST_INTERVAL = 1.5
CONFIDENCE = 0.95


def implementation(row: dict) -> str:
    """The row's implementation: ``official``, ``reference``, ``fastmae``, or one of the last
    two with ``+compile`` or ``+compile_blocks``."""
    return row["extra_info"]["impl"]


def _sort_key(impl: str):
    base, _, variant = impl.partition("+")
    return (variant, ORDER.index(base) if base in ORDER else len(ORDER))


# -- statistics of paired ratios ------------------------------------------------------------------


def median_interval(values: list[float], confidence: float = CONFIDENCE):
    """-> ``(median, low, high)``: the median of ``values`` and a distribution-free interval
    that holds the true median with probability >= ``confidence`` (the k-th smallest and k-th
    largest value, k from the Binomial(n, 1/2) tail). ``low``/``high`` are None when there
    are too few values for that confidence (fewer than 6 at 95%)."""
    ordered = sorted(values)
    n = len(ordered)
    median = statistics.median(ordered)
    tail, rank = 0.0, 0  # rank: how many values may lie outside on each side
    while rank < n:
        tail += math.comb(n, rank) / 2**n
        if tail > (1 - confidence) / 2:
            break
        rank += 1
    if rank == 0:
        return median, None, None
    return median, ordered[rank - 1], ordered[n - rank]


def verdict(low: float | None, high: float | None) -> str:
    """What a speedup interval lets one say."""
    if low is None:
        return "too few rounds"
    if high / low > WIDEST_INTERVAL:
        return "too wide to conclude"
    if low > 1:
        return "faster"
    if high < 1:
        return "slower"
    return "no clear difference"


# -- the table ------------------------------------------------------------------------------------


def speedups(rows: list[dict]) -> dict[str, dict[str, dict]]:
    """group -> impl -> dict(median, vs_reference, low, high, rounds, verdict, vs_official,
    gbps, copy_pct, peak_mb, cold_s).

    ``vs_reference`` is the median paired ratio where the row was timed paired with the
    reference (``low``/``high`` its interval), else the reference's median over the row's;
    ``vs_official`` is always the ratio of medians (None without that row)."""
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    for row in rows:
        groups[row["group"]][implementation(row)] = row
    table: dict[str, dict[str, dict]] = {}
    for group, impls in sorted(groups.items()):
        table[group] = {}
        for impl in sorted(impls, key=_sort_key):
            row, info = impls[impl], impls[impl]["extra_info"]
            entry = dict(median=row["median"], peak_mb=info.get("peak_mb"))
            if info.get("images"):  # the input group: images per batch
                entry["images"] = info["images"]
            entry["cold_s"] = info.get("cold_s")
            for baseline in ("reference", "official"):
                base = impls.get(baseline)
                entry[f"vs_{baseline}"] = base["median"] / row["median"] if base else None
            entry.update(low=None, high=None, rounds=None, verdict=None)
            ratios = (info.get("paired") or {}).get("ratios")
            if ratios:
                median, low, high = median_interval(ratios)
                entry.update(vs_reference=median, low=low, high=high, rounds=len(ratios))
                entry["verdict"] = verdict(low, high)
            entry["gbps"] = info["bytes"] / row["median"] / 1e9 if info.get("bytes") else None
            copy = info.get("copy_gbps")
            entry["copy_pct"] = 100 * entry["gbps"] / copy if entry["gbps"] and copy else None
            table[group][impl] = entry
    return table


def _cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _interval(entry: dict) -> str:
    if entry["low"] is None:
        return "-"
    return f"{entry['low']:.2f}-{entry['high']:.2f}"


def summarize(rows: list[dict]) -> str:
    """rows: dicts with ``group``, ``name``, ``median`` (s) and ``extra_info``."""
    table = speedups(rows)
    wide = max([len(group) for group in table] + [5])
    header = (
        f"{'group':{wide}} {'row':24} {'median':>11} {'vs ref':>7} {'95% interval':>12} "
        f"{'verdict':21} {'vs official':>11} {'GB/s':>6} {'% copy':>6} {'peak MB':>7} "
        f"{'cold s':>6}"
    )
    lines = ["", "fastmae benchmark summary (medians, forward+backward)", header, "-" * len(header)]
    for group, impls in table.items():
        for impl, entry in impls.items():
            lines.append(
                f"{group:{wide}} {impl:24} {entry['median'] * 1e3:>9.3f}ms "
                f"{_cell(entry['vs_reference'], '.2f'):>6}x {_interval(entry):>12} "
                f"{entry['verdict'] or '-':21} {_cell(entry['vs_official'], '.2f'):>10}x "
                f"{_cell(entry['gbps'], '.0f'):>6} {_cell(entry['copy_pct'], '.0f'):>5}% "
                f"{_cell(entry['peak_mb'], '.0f'):>7} {_cell(entry['cold_s'], '.1f'):>6}"
            )
    devices = {row["extra_info"].get("device") for row in rows} - {None}
    lines += input_budget(table, gpu=not all(d.startswith("CPU") for d in devices))
    lines.append(f"device: {', '.join(sorted(devices))}")
    lines.append(
        "vs ref: median of the per-round ratios, each round timing the reference and the row on "
        "the same inputs; 95% interval for that median; a verdict only where the interval's "
        f"ends are within {WIDEST_INTERVAL}x of each other."
    )
    lines.append(TARGETS)
    return "\n".join(lines)


def input_budget(table: dict[str, dict[str, dict]], gpu: bool) -> list[str]:
    """The input group's images/s per process, and for each image train-step group the CPU
    cores per GPU that each pipeline needs to keep its fastmae rows fed: the official one
    ``step / official`` (its workers decode and augment), fastmae's ``1 + step / workers``
    (the loading process, plus workers that read bytes); on a GPU, fastmae's batches take
    ``step / fastmae`` of the step's time to make (in the prefetch thread, alongside the step;
    over 100%, the step waits for them)."""
    rates = {
        impl: entry["images"] / entry["median"]
        for impl, entry in table.get("input", {}).items()
        if entry.get("images")
    }
    if not rates:
        return []
    lines = [
        "input, images/s of one process: " + ", ".join(f"{k} {v:.0f}" for k, v in rates.items())
    ]
    for group, impls in table.items():
        match = re.fullmatch(r"(?:vitmae )?train-step (\S+) n=(\d+)", group)
        if not match:
            continue
        for impl in ("fastmae", "fastmae+compile_blocks"):
            if impl not in impls:
                continue
            step = int(match[2]) / impls[impl]["median"]
            needs = []
            if "official" in rates:
                needs.append(f"official {step / rates['official']:.1f} cores")
            if "fastmae workers" in rates:
                needs.append(f"fastmae {1 + step / rates['fastmae workers']:.1f} cores")
            if gpu and "fastmae" in rates:
                needs.append(
                    f"fastmae's batches made in {100 * step / rates['fastmae']:.0f}% of a step"
                )
            lines.append(f"{group} {impl}: {step:.0f} images/s, to feed: {', '.join(needs)}")
    return lines


# -- results files --------------------------------------------------------------------------------


def results(rows: list[dict]) -> dict:
    """One run as a results record: machine, versions, and per group and row the median, the
    speedups with their interval and verdict, GB/s, peak memory and cold-start time."""
    infos = [row["extra_info"] for row in rows]
    machines = sorted({info.get("machine") or "unknown" for info in infos})
    return dict(
        machine=machines[0] if len(machines) == 1 else "+".join(machines),
        date=next((info["date"] for info in infos if info.get("date")), None),
        device=", ".join(sorted({info.get("device") or "" for info in infos} - {""})),
        versions=next((info["versions"] for info in infos if info.get("versions")), {}),
        groups=speedups(rows),
    )


def results_markdown(record: dict) -> str:
    versions = ", ".join(f"{name} {value}" for name, value in record["versions"].items())
    lines = [
        f"# fastmae benchmarks: {record['machine']}, {record['date']}",
        "",
        f"- device: {record['device']}",
        f"- versions: {versions}",
        "- written by `benchmarks/summary.py` (see benchmarks/README.md); compare two runs with "
        "`python -m benchmarks.summary --compare OLD.json NEW.json`",
        "- speedup: median of paired per-round ratios over the reference, with its 95% interval",
        "",
        "| group | row | median ms | vs reference | 95% interval | verdict | vs official | GB/s "
        "| % copy | peak MB |",
        "|---|---|---:|---:|---|---|---:|---:|---:|---:|",
    ]
    for group, impls in record["groups"].items():
        for impl, entry in impls.items():
            lines.append(
                f"| {group} | {impl} | {entry['median'] * 1e3:.3f} "
                f"| {_cell(entry['vs_reference'], '.2f')} | {_interval(entry)} "
                f"| {entry['verdict'] or '-'} | {_cell(entry['vs_official'], '.2f')} "
                f"| {_cell(entry['gbps'], '.0f')} | {_cell(entry['copy_pct'], '.0f')} "
                f"| {_cell(entry['peak_mb'], '.0f')} |"
            )
    budget = input_budget(record["groups"], gpu=not record["device"].startswith("CPU"))
    if budget:
        lines += ["", "## Input", ""] + [f"- {line}" for line in budget]
    return "\n".join(lines) + "\n"


def write_results(rows: list[dict], directory: str) -> str:
    """Writes ``<directory>/<machine>-<date>.md`` and ``.json`` (``-2``, ``-3``, ... when a run
    of that machine and day is already there); returns the path of the markdown file."""
    record = results(rows)
    os.makedirs(directory, exist_ok=True)
    stem = os.path.join(directory, f"{record['machine']}-{record['date']}")
    path, count = stem, 1
    while os.path.exists(path + ".json"):
        count += 1
        path = f"{stem}-{count}"
    with open(path + ".json", "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    with open(path + ".md", "w") as f:
        f.write(results_markdown(record))
    return path + ".md"


def machine_name(device_label: str) -> str:
    """A file-name slug for a machine: ``nvidia-h200``, ``cpu-x86_64-2cores``."""
    return re.sub(r"[^a-z0-9_]+", "-", device_label.lower()).strip("-")


def rows_from_json(path: str) -> list[dict]:
    """The rows of a pytest-benchmark JSON file."""
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


def load_record(path: str) -> dict:
    """A results record from a results file or a pytest-benchmark JSON file."""
    with open(path) as f:
        data = json.load(f)
    return data if "groups" in data else results(rows_from_json(path))


# -- comparing two runs ---------------------------------------------------------------------------


def compare(old: dict, new: dict) -> str:
    """How each row's speedup over the reference changed from ``old`` to ``new``: flagged
    ``changed`` where the two 95% intervals do not overlap, ``within noise`` where they do."""
    wide = max([len(group) for group in new["groups"]] + [5])
    header = (
        f"{'group':{wide}} {'row':24} {'old':>6} {'interval':>11} {'new':>6} {'interval':>11} "
        f"{'new/old':>7}  verdict"
    )
    lines = [
        f"speedup over the reference: {old['machine']} {old['date']} -> "
        f"{new['machine']} {new['date']}",
        header,
        "-" * len(header),
    ]
    for group, impls in new["groups"].items():
        for impl, after in impls.items():
            before = old["groups"].get(group, {}).get(impl)
            if before is None or impl == "reference" or after["vs_reference"] is None:
                continue
            if before["low"] is None or after["low"] is None:
                flag = "no interval"
            elif before["high"] < after["low"] or after["high"] < before["low"]:
                flag = "CHANGED"
            else:
                flag = "within noise"
            lines.append(
                f"{group:{wide}} {impl:24} {before['vs_reference']:>5.2f}x {_interval(before):>11} "
                f"{after['vs_reference']:>5.2f}x {_interval(after):>11} "
                f"{after['vs_reference'] / before['vs_reference']:>6.2f}x  {flag}"
            )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", nargs="?", help="a pytest-benchmark JSON file")
    parser.add_argument("--write", metavar="DIR", help="also write the results file there")
    parser.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"), help="two runs' JSON")
    options = parser.parse_args(argv)
    if options.compare:
        print(compare(*(load_record(path) for path in options.compare)))
        return
    if not options.run:
        parser.error("give a run's JSON, or --compare OLD NEW")
    rows = rows_from_json(options.run)
    print(summarize(rows))
    if options.write:
        print(f"wrote {write_results(rows, options.write)}")


if __name__ == "__main__":
    main(sys.argv[1:])
