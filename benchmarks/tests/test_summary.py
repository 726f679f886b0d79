"""The benchmark summary, results files, comparison and plot."""

import json
import math
import random
import re
from pathlib import Path

import pytest

from benchmarks import plot, summary

ROOT = Path(__file__).resolve().parents[2]


def row(group, impl, median, peak=None, cold=None, nbytes=None, ratios=None):
    info = dict(impl=impl, device="test device", peak_mb=peak, cold_s=cold, bytes=nbytes)
    info.update(machine="test-machine", date="2026-12-03", versions={"torch": "2.13.0"})
    info["paired"] = None if ratios is None else dict(baseline="reference", ratios=ratios)
    return dict(group=group, name=f"{group}[{impl}]", median=median, extra_info=info)


ROWS = [
    row("train-step", "official", 4.0, peak=1000, cold=0.5),
    row("train-step", "reference", 2.0, peak=800, cold=0.4),
    row("train-step", "fastmae", 1.0, peak=600, cold=0.4),
    row("train-step", "fastmae+compile_blocks", 0.5, peak=500, cold=30.0),
    row("loss-pix", "reference", 3.0, nbytes=6e9),
    row("loss-pix", "fastmae", 1.5, nbytes=6e9),
]


def test_speedups_over_reference_and_official():
    table = summary.speedups(ROWS)
    step = table["train-step"]
    assert list(step) == ["official", "reference", "fastmae", "fastmae+compile_blocks"]
    assert step["fastmae"]["vs_reference"] == 2.0 and step["fastmae"]["vs_official"] == 4.0
    assert step["fastmae+compile_blocks"]["vs_official"] == 8.0
    assert step["fastmae+compile_blocks"]["cold_s"] == 30.0
    assert table["loss-pix"]["fastmae"]["vs_official"] is None
    assert table["loss-pix"]["fastmae"]["gbps"] == pytest.approx(4.0)
    text = summary.summarize(ROWS)
    assert "fastmae+compile_blocks" in text and "8.00x" in text and "30.0" in text


def test_input_budget_turns_images_per_second_into_cores_per_gpu(tmp_path):
    """32 images a batch: official 100 images/s a process, fastmae workers 1000, fastmae 4000;
    a ViT-B step of 64 images in 0.02 s is 3200 images/s: 32 official cores, 1 + 3.2 fastmae
    cores, and fastmae's batch made in 80% of a step's time."""
    rows = [
        row("input", "official", 0.32),
        row("input", "fastmae workers", 0.032),
        row("input", "fastmae", 0.008),
        row("train-step mae_vit_base_patch16 n=64", "reference", 0.04),
        row("train-step mae_vit_base_patch16 n=64", "fastmae", 0.02),
    ]
    for entry in rows[:3]:
        entry["extra_info"]["images"] = 32
    table = summary.speedups(rows)
    cpu, gpu = summary.input_budget(table, gpu=False), summary.input_budget(table, gpu=True)
    assert (
        cpu[0] == "input, images/s of one process: official 100, fastmae 4000, fastmae workers 1000"
    )
    assert cpu[1] == (
        "train-step mae_vit_base_patch16 n=64 fastmae: 3200 images/s, to feed: official 32.0 "
        "cores, fastmae 4.2 cores"
    )
    assert gpu[1] == cpu[1] + ", fastmae's batches made in 80% of a step"
    assert summary.input_budget(summary.speedups(ROWS), gpu=False) == []
    markdown = Path(summary.write_results(rows, str(tmp_path))).read_text()
    assert "## Input" in markdown and "official 32.0 cores" in markdown


def test_plot_writes_a_png_from_a_json_run(tmp_path):
    results = tmp_path / "results.json"
    benchmarks = [
        dict(
            group=r["group"],
            name=r["name"],
            stats=dict(median=r["median"]),
            extra_info=r["extra_info"],
        )
        for r in ROWS
    ]
    results.write_text(json.dumps(dict(benchmarks=benchmarks)))
    output = tmp_path / "speedup.png"
    plot.main([str(results), "-o", str(output)])
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and output.stat().st_size > 10_000


@pytest.mark.parametrize("n", [6, 10, 12, 20, 41])
def test_median_interval_is_the_binomial_order_statistic_interval(n):
    values = random.Random(n).sample(range(1000), n)
    median, low, high = summary.median_interval(values)
    ordered = sorted(values)
    # k values may lie below the interval: the largest k with P(Binomial(n, 1/2) < k) <= 2.5%
    k = max(j for j in range(n) if sum(math.comb(n, i) for i in range(j)) / 2**n <= 0.025)
    assert (low, high) == (ordered[k - 1], ordered[n - k])
    assert low <= median <= high
    coverage = 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2**n
    assert coverage >= 0.95


def test_median_interval_needs_six_values_at_95_percent():
    assert summary.median_interval([1.0, 2.0, 3.0, 4.0, 5.0]) == (3.0, None, None)
    assert summary.median_interval([1, 2, 3, 4, 5, 6])[1:] == (1, 6)


@pytest.mark.parametrize(
    "low,high,expected",
    [
        (1.2, 1.4, "faster"),
        (0.7, 0.9, "slower"),
        (0.95, 1.1, "no clear difference"),
        (0.6, 1.4, "too wide to conclude"),
        (1.1, 1.9, "too wide to conclude"),
        (None, None, "too few rounds"),
    ],
)
def test_verdict(low, high, expected):
    assert summary.verdict(low, high) == expected


PAIRED = [
    row("loss-pix", "reference", 3.0),
    row("loss-pix", "fastmae", 1.0, ratios=[1.9, 2.0, 2.1, 2.05, 1.95, 2.2, 1.8, 2.0]),
    row("patchify", "reference", 3.0),
    row("patchify", "fastmae", 1.0, ratios=[0.5, 3.0, 1.0, 2.0, 0.8, 1.1, 1.5, 0.9]),
]


def test_paired_rows_report_the_median_ratio_and_its_interval():
    table = summary.speedups(PAIRED)
    loss = table["loss-pix"]["fastmae"]
    # the paired median, not the ratio of the two rows' medians (3.0)
    assert loss["vs_reference"] == pytest.approx(2.0) and loss["rounds"] == 8
    assert (loss["low"], loss["high"]) == (1.8, 2.2) and loss["verdict"] == "faster"
    assert table["patchify"]["fastmae"]["verdict"] == "too wide to conclude"
    text = summary.summarize(PAIRED)
    assert "1.80-2.20" in text and "too wide to conclude" in text


def test_results_are_written_as_markdown_and_json_without_overwriting(tmp_path):
    first = summary.write_results(PAIRED, str(tmp_path))
    second = summary.write_results(PAIRED, str(tmp_path))
    assert first == str(tmp_path / "test-machine-2026-12-03.md")
    assert second == str(tmp_path / "test-machine-2026-12-03-2.md")
    record = json.loads((tmp_path / "test-machine-2026-12-03.json").read_text())
    assert record["machine"] == "test-machine" and record["versions"] == {"torch": "2.13.0"}
    assert record["groups"]["loss-pix"]["fastmae"]["low"] == 1.8
    markdown = (tmp_path / "test-machine-2026-12-03.md").read_text()
    assert "| loss-pix | fastmae | 1000.000 | 2.00 | 1.80-2.20 | faster |" in markdown


def test_compare_flags_changes_beyond_the_measured_noise(tmp_path, capsys):
    old = summary.write_results(PAIRED, str(tmp_path))
    faster_loss = [2 * r for r in PAIRED[1]["extra_info"]["paired"]["ratios"]]
    shifted_patchify = [r * 1.1 for r in PAIRED[3]["extra_info"]["paired"]["ratios"]]
    new_rows = [
        PAIRED[0],
        row("loss-pix", "fastmae", 0.5, ratios=faster_loss),
        PAIRED[2],
        row("patchify", "fastmae", 0.9, ratios=shifted_patchify),
    ]
    new = summary.write_results(new_rows, str(tmp_path))
    summary.main(["--compare", old.replace(".md", ".json"), new.replace(".md", ".json")])
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[3:]}
    assert lines["loss-pix"].endswith("CHANGED") and "2.00x" in lines["loss-pix"]
    assert lines["patchify"].endswith("within noise")


def test_machine_names_are_file_name_slugs():
    assert summary.machine_name("NVIDIA H200") == "nvidia-h200"
    assert summary.machine_name("cpu x86_64 2cores") == "cpu-x86_64-2cores"


def test_gpu_check_fits_in_eight_minutes():
    """The check's own timeouts add up to at most 8 minutes, so a short GPU session can rerun it."""
    script = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    budget = re.search(r"^TESTS_S=.*$", script, re.M).group(0)
    steps = dict(item.split("=") for item in budget.split())
    assert set(steps) == {"TESTS_S", "STATIC_S", "BENCH_S", "PLOT_S", "ACCOUNT_S"}
    assert sum(int(seconds) for seconds in steps.values()) <= 8 * 60
    # every command that runs is under one of those timeouts
    timed = re.findall(r'timeout -k 5 "\$(\w+)"', script)
    assert sorted(timed) == sorted(steps)
    assert len(re.findall(r"python -m (pytest|benchmarks)", script)) == len(timed)
