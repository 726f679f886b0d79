"""A picture of a benchmark run: speedup per group and row, and peak-memory ratios.

    pytest benchmarks/ --benchmark-only --benchmark-json=results.json
    python -m benchmarks.plot results.json -o speedup.png

Left: each row's speedup over the group's ``reference`` row (1.0 = as fast), bars per row
kind. Right, where peak memory was recorded (GPU runs): each row's peak memory over the
reference's. Works from a CPU run's JSON too. Needs matplotlib (the ``bench`` extra).
"""

from __future__ import annotations

import argparse

from benchmarks.summary import rows_from_json, speedups


def plot(table: dict, title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(table)
    impls = sorted({impl for rows in table.values() for impl in rows if impl != "reference"})
    has_memory = any(
        entry["peak_mb"] for rows in table.values() for entry in rows.values() if entry
    )
    columns = 2 if has_memory else 1
    figure, axes = plt.subplots(
        1, columns, figsize=(7 * columns, 0.55 * len(groups) * max(len(impls), 1) + 1.5)
    )
    axes = [axes] if columns == 1 else list(axes)
    height = 0.8 / max(len(impls), 1)
    for axis, key, label in zip(
        axes,
        ("vs_reference", "memory"),
        ("speedup over the eager reference (higher is faster)", "peak memory / reference's"),
    ):
        for index, impl in enumerate(impls):
            values, positions = [], []
            for position, group in enumerate(groups):
                entry = table[group].get(impl)
                if entry is None:
                    continue
                if key == "memory":
                    reference = table[group].get("reference", {}).get("peak_mb")
                    value = entry["peak_mb"] / reference if entry["peak_mb"] and reference else None
                else:
                    value = entry["vs_reference"]
                if value is not None:
                    values.append(value)
                    positions.append(position + index * height)
            bars = axis.barh(positions, values, height=height, label=impl)
            axis.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
        axis.axvline(1.0, color="black", linewidth=0.8)
        axis.set_yticks([p + 0.4 - height / 2 for p in range(len(groups))], groups, fontsize=8)
        axis.invert_yaxis()
        axis.set_xlabel(label)
    axes[0].legend(fontsize=8, loc="lower right")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="pytest-benchmark JSON (--benchmark-json)")
    parser.add_argument("-o", "--output", default="speedup.png")
    options = parser.parse_args(argv)
    rows = rows_from_json(options.results)
    devices = sorted({row["extra_info"].get("device") or "" for row in rows})
    plot(speedups(rows), "fastmae benchmarks: " + "; ".join(devices), options.output)
    print(f"wrote {options.output}")


if __name__ == "__main__":
    main()
