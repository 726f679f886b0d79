"""pytest-benchmark setup: reference vs fastmae rows per group, honest timing on CPU and CUDA.

- Both rows of a group get the same input sets; each call takes the next set, so a small op
  is not timed out of cache.
- Warm-up rounds (and torch.compile's compilation) run before the clock starts.
- On CUDA the timed function ends with a synchronize, so the clock sees the GPU work.

Rows: ``reference`` and ``fastmae`` everywhere; the training step also has ``official`` (the
reference with timm 0.3.2's explicit attention arithmetic instead of SDPA: what someone running
facebookresearch/mae has) and, on a GPU or with ``--fastmae-compile-blocks``,
``reference+compile_blocks`` and ``fastmae+compile_blocks`` (:func:`fastmae.compile_blocks`).
Each row records its cold first call (compilation included) as ``cold_s``.

Options: ``--fastmae-compile`` adds ``reference+compile`` and ``fastmae+compile`` rows to the op
groups, ``--fastmae-compile all`` to the training steps too (compiling a whole ViT takes minutes);
``--fastmae-compile-blocks`` adds the compile_blocks rows on the CPU;
``--fastmae-models`` (or FASTMAE_BENCH_MODELS) picks the training-step models, comma-separated;
``--fastmae-batch`` (or FASTMAE_BENCH_BATCH) overrides the batch size.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass

import pytest
import torch

from benchmarks.summary import summarize

GPU = torch.cuda.is_available()


def pytest_addoption(parser):
    group = parser.getgroup("fastmae")
    group.addoption(
        "--fastmae-compile",
        nargs="?",
        const="ops",
        choices=["ops", "all"],
        help="add torch.compile rows: to the op groups (ops, the default) or to all groups",
    )
    group.addoption(
        "--fastmae-models",
        default=os.environ.get(
            "FASTMAE_BENCH_MODELS",
            "mae_vit_base_patch16,mae_vit_large_patch16" if GPU else "mae_vit_base_patch16",
        ),
        help="comma-separated factory names for the training-step group",
    )
    group.addoption("--fastmae-batch", type=int, default=os.environ.get("FASTMAE_BENCH_BATCH"))
    group.addoption(
        "--fastmae-compile-blocks",
        action="store_true",
        default=GPU,
        help="add compile_blocks rows to the training steps (on by default on a GPU)",
    )


def pytest_generate_tests(metafunc):
    if "impl" in metafunc.fixturenames:
        impls = ["reference", "fastmae"]
        compile_rows = metafunc.config.getoption("--fastmae-compile")
        is_step = "model_name" in metafunc.fixturenames
        if is_step:
            impls.insert(0, "official")
            if metafunc.config.getoption("--fastmae-compile-blocks"):
                impls += ["reference+compile_blocks", "fastmae+compile_blocks"]
        if compile_rows == "all" or (compile_rows == "ops" and not is_step):
            impls += ["reference+compile", "fastmae+compile"]
        metafunc.parametrize("impl", impls)
    if "model_name" in metafunc.fixturenames:
        names = [m.strip() for m in metafunc.config.getoption("--fastmae-models").split(",")]
        metafunc.parametrize("model_name", [m for m in names if m])


@dataclass
class Settings:
    device: torch.device
    batch: int
    step_batch: int
    autocast_dtype: torch.dtype | None
    rounds: int
    warmup: int
    input_sets: int

    def autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def label(self) -> str:
        if self.device.type == "cuda":
            name = torch.cuda.get_device_name()
            return f"{name}, torch {torch.__version__}, Triton kernels, bf16 autocast"
        return f"CPU ({platform.processor() or platform.machine()}), torch path, fp32"


@pytest.fixture(scope="session")
def settings(request) -> Settings:
    batch = request.config.getoption("--fastmae-batch")
    if GPU:
        return Settings(
            torch.device("cuda"),
            int(batch or 256),
            int(batch or 256),
            torch.bfloat16,
            rounds=20,
            warmup=3,
            input_sets=3,
        )
    return Settings(
        torch.device("cpu"),
        int(batch or 8),
        int(batch or 2),
        None,
        rounds=10,
        warmup=1,
        input_sets=2,
    )


@pytest.fixture(scope="session")
def copy_gbps(settings) -> float | None:
    """Measured device-to-device copy bandwidth (bytes read + written), GPU only."""
    if settings.device.type != "cuda":
        return None
    src = torch.empty(2**28, dtype=torch.float32, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return 2 * src.numel() * 4 / times[len(times) // 2] / 1e9


@pytest.fixture
def measure(request, benchmark, settings, copy_gbps):
    """``measure(step, input_sets, bytes_moved)`` times ``step(*inputs)`` over rotating inputs."""

    def run(step, input_sets, bytes_moved=None):
        device = settings.device
        calls = iter(range(10**9))

        def timed():
            step(*input_sets[next(calls) % len(input_sets)])
            if device.type == "cuda":
                torch.cuda.synchronize()

        benchmark.extra_info.update(
            impl=request.node.callspec.params["impl"],
            device=settings.label(),
            bytes=bytes_moved,
            copy_gbps=copy_gbps,
            peak_mb=None,
        )
        cold = time.perf_counter()
        timed()  # the cold first call: compilation and autotuning, out of the clock
        benchmark.extra_info["cold_s"] = time.perf_counter() - cold
        for _ in range(settings.warmup - 1):
            timed()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            timed()
            benchmark.extra_info["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        benchmark.pedantic(timed, rounds=settings.rounds, iterations=1, warmup_rounds=1)

    return run


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    rows = [
        dict(group=b.group, name=b.name, median=b.stats.median, extra_info=b.extra_info)
        for b in session.benchmarks
        if b
    ]
    terminalreporter.write_line(summarize(rows))
