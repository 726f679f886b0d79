#!/usr/bin/env bash
# The GPU check, one script: tests on CUDA, the static kernel check, the benchmarks at GPU
# sizes, a short table last. Needs torch and triton installed; downloads nothing.
#   benchmarks/gpu_check.sh OUTDIR          (at most about 8 minutes on an H100)
# On a machine without a GPU it runs the same steps on the CPU path (a dry run).
set -uo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
python -c "import fastmae.kernels" 2>/dev/null ||
    python -m pip install -q --no-deps --no-build-isolation -e . >"$out/install.txt" 2>&1
{
    date -u
    python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
} | tee "$out/env.txt"

status=0
echo "== tests (CUDA parity where a GPU is present)"
timeout 240 python -m pytest tests/ -q -x -p no:cacheprovider 2>&1 | tee "$out/tests.txt" | tail -3
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "== static check"
timeout 60 python -m benchmarks.static_check --markdown >"$out/static_check.md" 2>&1 || status=1
tail -n +3 "$out/static_check.md" | head -3
echo "== benchmarks"
timeout 300 python -m pytest benchmarks/ --benchmark-only -q -p no:cacheprovider \
    --benchmark-json="$out/benchmarks.json" ${FASTMAE_BENCH_ARGS:---fastmae-compile ops} \
    >"$out/benchmarks.txt" 2>&1 ||
    status=1
sed -n '/fastmae benchmark summary/,$p' "$out/benchmarks.txt"
echo "== plot and accounting"
timeout 60 python -m benchmarks.plot "$out/benchmarks.json" -o "$out/speedup.png" || status=1
timeout 300 python -m benchmarks.account --models mae_vit_base_patch16 >"$out/account.md" 2>&1 ||
    status=1
tail -n 12 "$out/account.md"
echo "gpu_check: exit $status; full results in $out"
exit $status
