"""pytest-benchmark setup: reference vs fastmae rows per group, timed paired on CPU and CUDA.

- Every row but the reference is timed paired with it: each round runs the reference step
  right before or right after the row's step (at random), on the same input set, and the
  per-round ratios go to the row's ``extra_info["paired"]`` (the summary's median speedup and
  95% interval come from them).
- Input sets rotate, so a small op is not timed out of cache; warm-up rounds (and
  torch.compile's compilation, recorded as ``cold_s``) run before the clock starts; on CUDA
  the timed function ends with a synchronize, so the clock sees the GPU work.
- With ``--benchmark-disable`` (CI's smoke run) each step runs once, baseline included.

Rows: ``reference`` and ``fastmae`` everywhere; the training steps also have ``fastmae
decoder_mask 0.5`` and ``0.75`` (the fused model with ``decoder_mask_ratio``); the
image training step also has ``official`` (the reference with timm 0.3.2's explicit
attention arithmetic instead of SDPA: what someone running facebookresearch/mae has) and,
on a GPU or with ``--fastmae-compile-blocks``, ``reference+compile_blocks`` and
``fastmae+compile_blocks`` (:func:`fastmae.compile_blocks`).

Options: ``--fastmae-compile`` adds ``reference+compile`` and ``fastmae+compile`` rows to the op
groups, ``--fastmae-compile all`` to the training steps too (compiling a whole ViT takes minutes);
``--fastmae-compile-blocks`` adds the compile_blocks rows on the CPU;
``--fastmae-models`` (or FASTMAE_BENCH_MODELS) picks the training-step models, comma-separated;
``--fastmae-batch`` (or FASTMAE_BENCH_BATCH) overrides the batch size;
``--fastmae-results DIR`` (or FASTMAE_BENCH_RESULTS) writes the run's results file there.
"""

from __future__ import annotations

import datetime
import inspect
import os
import platform
import random
import subprocess
import time
from dataclasses import dataclass

import pytest
import torch

from benchmarks.account import count_bytes as bytes_moved
from benchmarks.summary import machine_name, summarize, write_results
from fastmae.config import MASK_RATIO

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
        "--fastmae-results",
        metavar="DIR",
        default=os.environ.get("FASTMAE_BENCH_RESULTS"),
        help="write the run's results as DIR/<machine>-<date>.md and .json",
    )
    group.addoption(
        "--fastmae-compile-blocks",
        action="store_true",
        default=GPU,
        help="add compile_blocks rows to the training steps (on by default on a GPU)",
    )


# The drop-ins' training-step rows with decoder masking on, and their ratios.
DECODER_MASK_ROWS = {"fastmae decoder_mask 0.5": 0.5, "fastmae decoder_mask 0.75": 0.75}
DECODER_MASKED_STEPS = (
    "test_train_step",
    "test_video_train_step",
    "test_vitmae_train_step",
    "test_videomae_train_step",
)


def decoder_mask_ratio(impl: str) -> float:
    """The ``decoder_mask_ratio`` a row's model is built with (0: the official decoder)."""
    return DECODER_MASK_ROWS.get(impl, 0.0)


def pytest_generate_tests(metafunc):
    if "impl" in metafunc.fixturenames:
        impls = ["reference", "fastmae"]
        compile_rows = metafunc.config.getoption("--fastmae-compile")
        is_step = "model_name" in metafunc.fixturenames
        if metafunc.function.__name__ in DECODER_MASKED_STEPS:
            impls += list(DECODER_MASK_ROWS)
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
        rounds=12,
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


def versions() -> dict:
    """The versions a run used: Python, torch, Triton, and fastmae's commit where known."""
    found = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        found["triton"] = triton.__version__
    except ImportError:
        pass
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(
            ["git", "-C", root, "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    found["fastmae"] = commit or "unknown"
    return found


@pytest.fixture(scope="session")
def run_info(settings) -> dict:
    """What every row records about the run: device, machine slug, date, versions."""
    label = settings.label()
    if settings.device.type == "cuda":
        machine = machine_name(torch.cuda.get_device_name())
    else:
        machine = machine_name(f"cpu {platform.machine()} {os.cpu_count()}cores")
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    return dict(device=label, machine=machine, date=date, versions=versions())


def training_step(model, forward, settings, mask_ratio=MASK_RATIO):
    """One optimisation step of ``model`` (``forward`` may be its compiled form), as the
    official engine runs it, on a batch of images or clips."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.5e-4, betas=(0.9, 0.95))

    def step(imgs):
        with settings.autocast():
            loss, _, _ = forward(imgs, mask_ratio=mask_ratio)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def step_timer(step, input_sets, device):
    """``timed(index)`` runs ``step`` on input set ``index`` (modulo their number) and returns
    its wall time; on CUDA it ends with a synchronize, so the clock sees the GPU work."""

    def timed(index: int) -> float:
        start = time.perf_counter()
        step(*input_sets[index % len(input_sets)])
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    return timed


@pytest.fixture
def measure(request, benchmark, settings, copy_gbps, run_info):
    """``measure(make_step, input_sets, count_bytes=True)`` times ``make_step(impl)(*inputs)``
    over rotating input sets.

    ``make_step(impl)`` builds the step of one row (``"reference"``, ``"fastmae"``, ...). A row
    other than the reference is timed paired: each round runs the reference step on an input
    set (timed here) right before or right after the row's step on the same set (timed by
    pytest-benchmark and here), at random; the per-round ratios go to
    ``extra_info["paired"]``. ``count_bytes`` rates the
    group by the bytes the fastmae step moves (:func:`benchmarks.account.count_bytes`).
    """

    def run(make_step, input_sets, count_bytes=True):
        impl = request.node.callspec.params["impl"]
        step = step_timer(make_step(impl), input_sets, settings.device)
        nbytes = bytes_moved(make_step("fastmae"), *input_sets[0]) if count_bytes else None
        benchmark.extra_info.update(
            run_info, impl=impl, bytes=nbytes, copy_gbps=copy_gbps, peak_mb=None, paired=None
        )
        rounds = iter(range(10**9))
        if benchmark.disabled:  # a smoke run: each step once
            baseline = step_timer(make_step("reference"), input_sets, settings.device)

            def baseline_once():
                baseline(0)
                return (0,), {}

            benchmark.pedantic(step, setup=baseline_once, rounds=1)
            return
        benchmark.extra_info["cold_s"] = step(next(rounds))  # compilation and autotuning
        for _ in range(settings.warmup - 1):
            step(next(rounds))
        if settings.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            step(next(rounds))
            benchmark.extra_info["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        if impl == "reference":
            benchmark.pedantic(
                step, setup=lambda: ((next(rounds),), {}), rounds=settings.rounds, warmup_rounds=1
            )
            return
        baseline = step_timer(make_step("reference"), input_sets, settings.device)
        for _ in range(settings.warmup):
            baseline(0)
        # The reference runs right before or right after the row, at random, so that a load
        # that comes and goes with the rounds' rhythm favours neither side (pytest-benchmark
        # older than 5.2 has no teardown: there the reference always runs first).
        order = random.Random(request.node.name)
        random_order = "teardown" in inspect.signature(benchmark.pedantic).parameters
        pairs = []

        def start_round():
            index = next(rounds)
            before = not random_order or order.random() < 0.5
            pairs.append(dict(reference=baseline(index) if before else None))
            return (index,), {}

        def row(index):
            pairs[-1]["row"] = step(index)

        def end_round(index):
            if pairs[-1]["reference"] is None:
                pairs[-1]["reference"] = baseline(index)

        teardown = dict(teardown=end_round) if random_order else {}
        benchmark.pedantic(
            row, setup=start_round, rounds=settings.rounds, warmup_rounds=1, **teardown
        )
        # after the warm-up round
        ratios = [pair["reference"] / pair["row"] for pair in pairs[1:]]
        benchmark.extra_info["paired"] = dict(baseline="reference", ratios=ratios)

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
    directory = config.getoption("--fastmae-results")
    if directory:
        path = write_results(rows, directory)
        terminalreporter.write_line(f"results: {path} and {path[:-3]}.json")
