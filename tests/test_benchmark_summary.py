"""The benchmark summary and plot: speedups over the reference and official rows, a PNG."""

import json

import pytest

from benchmarks import plot, summary


def row(group, impl, median, peak=None, cold=None, nbytes=None):
    info = dict(impl=impl, device="test device", peak_mb=peak, cold_s=cold, bytes=nbytes)
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
