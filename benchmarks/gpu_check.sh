#!/usr/bin/env bash
# The GPU check, one script for a GPU: the CUDA tests, the static kernel check, the
# benchmarks at GPU sizes with a results file, the plot and the accounting. Downloads nothing.
#   benchmarks/gpu_check.sh OUTDIR
# Each step has its own timeout; together they are at most 8 minutes (480 s), so that a short
# GPU session has room for a rerun. On a machine without a
# GPU it runs the same steps on the CPU path (a dry run).
set -uo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$out/results"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
# seconds per step; their sum is the script's bound (benchmarks/tests/test_summary.py keeps it <= 480)
TESTS_S=150 STATIC_S=30 BENCH_S=240 PLOT_S=30 ACCOUNT_S=30
python -c "import fastmae.kernels" 2>/dev/null ||
    python -m pip install -q --no-deps --no-build-isolation -e . >"$out/install.txt" 2>&1
{
    date -u
    python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
} | tee "$out/env.txt"

status=0
# The CUDA tests (the rest of the suite runs on CPU tensors, as CI runs it).
echo "== CUDA tests, at most ${TESTS_S}s"
timeout -k 5 "$TESTS_S" python -m pytest tests/test_cuda.py tests/test_data/test_cuda.py -q -p no:cacheprovider -rA 2>&1 |
    tee "$out/tests.txt" | tail -3
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "== static check, at most ${STATIC_S}s"
timeout -k 5 "$STATIC_S" python -m benchmarks.static_check --markdown >"$out/static_check.md" 2>&1 ||
    status=1
tail -n +3 "$out/static_check.md" | head -3
echo "== benchmarks, at most ${BENCH_S}s"
timeout -k 5 "$BENCH_S" python -m pytest benchmarks/ --benchmark-only -q -p no:cacheprovider \
    --benchmark-json="$out/benchmarks.json" --fastmae-results "$out/results" \
    ${FASTMAE_BENCH_ARGS:---fastmae-models mae_vit_base_patch16} \
    >"$out/benchmarks.txt" 2>&1 ||
    status=1
sed -n '/fastmae benchmark summary/,$p' "$out/benchmarks.txt"
echo "== plot and accounting, at most $((PLOT_S + ACCOUNT_S))s"
timeout -k 5 "$PLOT_S" python -m benchmarks.plot "$out/benchmarks.json" -o "$out/speedup.png" ||
    status=1
timeout -k 5 "$ACCOUNT_S" python -m benchmarks.account --models mae_vit_base_patch16 \
    >"$out/account.md" 2>&1 || status=1
tail -n 12 "$out/account.md"
echo "gpu_check: exit $status; full results in $out"
if ls "$out"/results/*.md >/dev/null 2>&1; then
    echo "to commit (results from a GPU are tracked):"
    echo "  cp $out/results/* benchmarks/results/ && git add benchmarks/results/ &&" \
        "git commit -m 'Benchmark results: $(basename "$out"/results/*.md .md)'"
fi
exit $status
