#!/usr/bin/env bash
# Compatibility check across Triton (and torch) versions, run by hand, not by CI.
#
#   bash benchmarks/compat.sh                  # the oldest and newest supported Triton
#   bash benchmarks/compat.sh 3.0.0 3.6.0 3.9.0
#   TORCH_VERSION=2.4.0 bash benchmarks/compat.sh 3.0.0   # another torch (a CUDA build from PyPI)
#
# For each Triton version it builds a throw-away venv (torch $TORCH_VERSION, default the
# 2.13.0 CPU build, with that Triton forced in; numpy pinned where an old interpreter needs it),
# installs fastmae into it, runs the static sm_90/sm_80 compile check and the Triton interpreter
# tests ($COMPAT_TESTS, default tests/test_kernels), and prints one verdict line per version.
# Venvs live under $COMPAT_DIR (default /tmp/fastmae-compat) and are reused when present.
set -uo pipefail
cd "$(dirname "$0")/.."
versions=("$@")
[ ${#versions[@]} -eq 0 ] && versions=(3.0.0 3.9.0)
torch_version=${TORCH_VERSION:-2.13.0}
tests=${COMPAT_TESTS:-tests/test_kernels}
root=${COMPAT_DIR:-/tmp/fastmae-compat}
mkdir -p "$root"

numpy_pin() {  # the interpreters of Triton 3.0/3.1 give garbage with numpy 2; 3.6's fails on 2.4
  case "$1" in
    3.0.*|3.1.*) echo "numpy<2" ;;
    3.[2-8].*) echo "numpy<2.3" ;;
    *) echo "numpy" ;;
  esac
}

verdicts=()
for version in "${versions[@]}"; do
  venv="$root/torch-$torch_version-triton-$version"
  log="$root/torch-$torch_version-triton-$version.log"
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv" &&
      "$venv/bin/pip" install -q "torch==$torch_version" &&
      "$venv/bin/pip" install -q "triton==$version" "$(numpy_pin "$version")" pytest safetensors pillow
  fi >"$log" 2>&1
  "$venv/bin/pip" install -q --no-deps -e . >>"$log" 2>&1
  found=$("$venv/bin/python" -c "import torch, triton, numpy; print(f'torch {torch.__version__}, Triton {triton.__version__}, numpy {numpy.__version__}')" 2>>"$log")
  static=$(TRITON_INTERPRET=0 "$venv/bin/python" -m benchmarks.static_check 2>>"$log" | tee -a "$log")
  if [ $? -eq 0 ] && [ -n "$static" ]; then
    kernels=$(grep -c " sm_[89]0 " <<<"$static")
    spills=$(awk '$0 ~ / sm_[89]0 / { if ($0 !~ / 0\/0 /) n++ } END { print n + 0 }' <<<"$static")
    static_verdict="static check: $kernels kernel builds, $spills with spills"
  else
    static_verdict="static check: FAILED (see $log)"
  fi
  summary=$("$venv/bin/python" -m pytest "$tests" -q -p no:cacheprovider 2>&1 | tee -a "$log" | tail -1)
  verdicts+=("$found: $static_verdict; $tests: $summary")
done
echo
for line in "${verdicts[@]}"; do echo "$line"; done
