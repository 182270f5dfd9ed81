#!/usr/bin/env bash
# Rehearses benchmarks/gpu_session.sh on this CPU machine with the GPU machine's own versions (device tool,
# KINDS.md: Python 3.12, torch 2.11.0+cu130, triton 3.6.0), before any device time is spent on it:
#
#   bash benchmarks/gpu_rehearsal.sh          # about 20 min on 2 cores, plus about 3 GB of downloads
#
# In a fresh virtual environment of that Python (a clone of this checkout's HEAD, so edits in progress stay out):
# installs those releases from the package registry (torch 2.11 comes only as a CUDA build there, hence the
# download; it runs on the CPU), builds the extension the way gpu_session.sh does (pip --no-build-isolation
# --no-deps, CUDA kernels for sm_90 with this machine's nvcc), runs the whole test suite, then gpu_session.sh at the
# quick size, one round per case (the flow, not the figures). Output: $OUT (default /tmp/dsrb-gpu-rehearsal).
#
# numpy stays below 2.4 here: triton < 3.7's interpreter, which runs the Triton kernels on the CPU, fails under
# numpy >= 2.4 (tests/helpers.py, triton_interpreter_problem). The GPU machine compiles the kernels instead.
# Override the versions with DSRB_REHEARSAL_PYTHON, DSRB_REHEARSAL_TORCH, DSRB_REHEARSAL_TRITON; the oldest this
# library supports (pyproject.toml; the README says what skips there):
#
#   DSRB_REHEARSAL_PYTHON=python3.9 DSRB_REHEARSAL_TORCH=2.6.0 DSRB_REHEARSAL_TRITON=3.2.0 bash benchmarks/gpu_rehearsal.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${DSRB_REHEARSAL_PYTHON:-python3.12}"
if ! "$PY" --version >/dev/null 2>&1; then  # a pyenv shim with 3.12 not selected: its own installation
    PY="$(ls -d "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12 2>/dev/null | tail -1)"
    [ -n "$PY" ] || { echo "no Python 3.12 found: set DSRB_REHEARSAL_PYTHON" >&2; exit 1; }
fi
TORCH="${DSRB_REHEARSAL_TORCH:-2.11.0}"
TRITON="${DSRB_REHEARSAL_TRITON:-3.6.0}"
OUT="${OUT:-/tmp/dsrb-gpu-rehearsal}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT  # the venv with a CUDA torch is about 5 GB
mkdir -p "$OUT"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
export DSRB_EXT_CACHE="$WORK/ext" TORCHINDUCTOR_CACHE_DIR="$WORK/inductor"

git clone -q . "$WORK/tree"
COMMIT="$(git rev-parse HEAD)"
"$PY" -m venv "$WORK/venv"
# shellcheck disable=SC1091
source "$WORK/venv/bin/activate"
echo "== installing torch==$TORCH triton==$TRITON for $("$PY" --version) (a CUDA build of torch: about 3 GB)"
pip install -q "torch==$TORCH" "triton==$TRITON" "numpy<2.4" pillow ninja "pytest>=7" "pytest-benchmark>=4" pyyaml \
    matplotlib "setuptools>=64" wheel "importlib_metadata; python_version < '3.10'" 2>&1 | { grep -v "^WARNING: Location" || true; }
python -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__)" \
    | tee "$OUT/versions.txt"

cd "$WORK/tree"
echo "== build (as gpu_session.sh: --no-build-isolation --no-deps, sm_90)"
DSRB_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 python -m pip install -q --no-build-isolation --no-deps -e . \
    >"$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
export DSRB_REQUIRE_EXT=1
python -m dsrb.info | tee -a "$OUT/versions.txt"

echo "== the test suite"
python -m pytest tests -q -rs -p no:cacheprovider >"$OUT/tests.log" 2>&1 || { tail -40 "$OUT/tests.log"; exit 1; }
tail -1 "$OUT/tests.log"

echo "== gpu_session.sh, quick size, one round per case"
OUT="$OUT/session" DSRB_GPU_SESSION_INSTALL=0 DSRB_BENCH_SIZE=quick DSRB_BENCH_ROUNDS=1 DSRB_COMMIT="$COMMIT" \
    bash benchmarks/gpu_session.sh >"$OUT/session.log" 2>&1 || { tail -40 "$OUT/session.log"; exit 1; }
if grep -qE "NOT loaded|== ERROR" "$OUT/session.log" ||
    grep -hE "[0-9]+ (failed|errors?)\b" "$OUT/session/tests.log" "$OUT/session/bench.log"; then
    echo "== rehearsal FAILED: see $OUT/session.log and $OUT/session/" >&2
    exit 1
fi
echo "== rehearsal passed at $COMMIT; logs in $OUT"
