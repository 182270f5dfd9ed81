#!/usr/bin/env bash
# One call on a lent GPU machine (see benchmarks/RESULTS.md): install dsrb from this tree and build its C++/CUDA
# extension there (sm_90, the host's nvcc), print what serves each op, run the test suite (the GPU-only cases
# included), then the paper-scale benchmarks. Everything lands in $OUT.
#
#   run: bash benchmarks/gpu_session.sh [all|tests|bench]   (default all; the device allows 600 s a call, so a
#        session may run "tests" then "bench" in two calls: the in-place build of the first call is kept)
set -uo pipefail
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR="$(mktemp -d)" DSRB_EXT_CACHE="$(mktemp -d)"
export DSRB_REQUIRE_EXT=1 DSRB_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
PHASE="${1:-all}"
if [ "$PHASE" != bench ] || ! python3 -c "import dsrb" 2>/dev/null; then  # "bench" reuses the earlier install
    python3 -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/install.log" 2>&1 || { tail -20 "$OUT/install.log"; exit 1; }
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; git rev-parse HEAD 2>/dev/null;
  python3 -m dsrb.info; } | tee "$OUT/info.txt"
if [ "$PHASE" != bench ]; then
    python3 -m pytest tests -q -p no:cacheprovider -rs 2>&1 | tee "$OUT/tests.log" | tail -15
fi
[ "$PHASE" = tests ] && exit 0
python3 -m pytest benchmarks --benchmark-only --bench-size full --benchmark-json "$OUT/bench-full.json" \
    --benchmark-columns=median,iqr,rounds --benchmark-sort=name 2>&1 | tee "$OUT/bench.log" | tail -5
python3 -m benchmarks.report "$OUT/bench-full.json" | tee "$OUT/report.md" | tail -60
