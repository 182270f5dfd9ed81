#!/usr/bin/env bash
# One call on a lent GPU machine, inside the device's time (benchmarks/RESULTS.md, "GPU results"):
#
#   run(command="DSRB_COMMIT=<git rev-parse HEAD, here> bash benchmarks/gpu_session.sh", timeout_s=600)
#
# (the copy of the tree on the device may lack .git, so the commit is passed in to be recorded in info.txt)
#
# Installs dsrb from this tree and builds its C++/CUDA extension there (sm_90, the host's nvcc), prints what serves
# each op, runs the GPU tests, a preflight of each fused backend (one that faults is left out of the benchmarks), then
# the benchmarks in the order of the issues' targets (full size). Every part has its own cap and runs under what is
# left of one time budget, DSRB_GPU_BUDGET seconds (default 540, so the call ends inside the 600 s limit with the
# report written); a part that reaches either is interrupted with SIGINT, and pytest-benchmark still writes the cases
# it finished. After each benchmark part the finished cases are merged and the report
# (targets first) is rewritten, so whatever the call reaches comes back in $OUT:
#
#   build.log, info.txt, tests.log (the GPU tests), bench.log (with the preflights' and profile_ops' logs),
#   bench-full.json (every finished case), report.md, profile.md (host vs device time of each op call,
#   benchmarks/profile_ops.py)
#
# That is 7 files: the device tool brings back at most 8 from $OUT (device/README.md), and the call ends by
# saying so if there are more.
#
# DSRB_BENCH_ROUNDS (default here 20) sets the timed rounds per case. Rehearse on a CPU machine first:
# benchmarks/gpu_rehearsal.sh does it with the GPU machine's Python, torch and triton; in the current environment,
# with the package installed and its extension built, set DSRB_GPU_SESSION_INSTALL=0
# DSRB_EXT_CACHE=~/.cache/dsrb/extensions DSRB_BENCH_SIZE=quick DSRB_BENCH_ROUNDS=1 (the flow, not the figures).
set -uo pipefail
START=$SECONDS
BUDGET="${DSRB_GPU_BUDGET:-540}"
OUT="${OUT:-$PWD/gpu-out}"
SCRATCH="$(mktemp -d)"  # the parts' logs and fresh caches, removed on exit (a rehearsal runs this on a CPU machine)
trap 'rm -rf "$SCRATCH"' EXIT
PARTS="$SCRATCH/parts"
mkdir -p "$OUT" "$PARTS"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1  # the machine reaches no package registry
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR="$SCRATCH/inductor" DSRB_EXT_CACHE="${DSRB_EXT_CACHE:-$SCRATCH/ext}"
export DSRB_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
export DSRB_BENCH_SIZE="${DSRB_BENCH_SIZE:-full}" DSRB_BENCH_ROUNDS="${DSRB_BENCH_ROUNDS:-20}"
# Carried wheels (device/README.md), for packages the machine lacks.
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

exec 3>&1  # progress lines reach the call's output even from parts whose output goes to a log
left() { echo $((BUDGET - (SECONDS - START))); }

# part NAME NEED CAP CMD...: run CMD for at most CAP seconds (0: no cap) and never past the budget; skipped when less
# than NEED seconds are left. SIGINT at the deadline, SIGKILL 20 s later.
part() {
    local name=$1 need=$2 cap=$3 t
    shift 3
    t=$(left)
    if ((t < need)); then
        echo "== $name: skipped (${t} s of the budget left, needs ${need} s)" >&3
        return 0
    fi
    ((cap > 0 && cap < t)) && t=$cap
    echo "== $name: $((SECONDS - START)) s into the call, up to ${t} s" >&3
    timeout -s INT -k 20 "$t" "$@"
    local rc=$?
    ((rc == 124)) && echo "== $name: interrupted at its time limit" >&3
    return $rc
}

# bench NAME NEED CAP EXPR FILE...: one benchmark part (pytest -k EXPR over FILEs, less the backends a preflight
# left out), then the merged JSON and the report. CAP: a hung case costs that part, not the rest of the budget.
bench() {
    local name=$1 need=$2 cap=$3 expr=$4 select=()
    shift 4
    if [ -n "$expr" ] && [ -n "$LEFT_OUT" ]; then expr="($expr) and $LEFT_OUT"; else expr="${expr:-$LEFT_OUT}"; fi
    [ -n "$expr" ] && select=(-k "$expr")
    BENCH_PARTS=$((BENCH_PARTS + 1))
    echo "== bench $name: ${select[*]} $*" >>"$OUT/bench.log"
    part "bench $name" "$need" "$cap" python3 -m pytest "$@" --benchmark-only -q -p no:cacheprovider -rs \
        "${select[@]}" \
        --benchmark-json "$PARTS/$(printf '%02d' "$BENCH_PARTS")-$name.json" \
        --benchmark-columns=median,iqr,rounds --benchmark-sort=name >>"$OUT/bench.log" 2>&1
    local files=("$PARTS"/*.json)
    [ -e "${files[0]}" ] || return 0
    python3 -m benchmarks.report "${files[@]}" --merged-json "$OUT/bench-full.json" >"$OUT/report.md" 2>&1
}
BENCH_PARTS=0
LEFT_OUT=""  # "not cuda and not triton": fused backends whose preflight failed
SKIP=()  # the same for profile_ops: --skip cuda --skip triton

# 1. Install and build (-v: the compilers' output goes to build.log). A failed build is reported by setup.py, the
#    package installs without the extension (setup.py marks it optional) and the rest runs on the triton backend.
if [ "${DSRB_GPU_SESSION_INSTALL:-1}" = 1 ]; then
    part install 60 300 python3 -m pip install -v --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 ||
        { tail -30 "$OUT/build.log"; exit 1; }
fi
export DSRB_BUILD_ON_FIRST_USE=0  # never a second (first-use) build inside a timed part
if python3 -c "import sys, dsrb._ext as e; sys.exit(0 if e.load().loaded else 1)"; then
    export DSRB_REQUIRE_EXT=1
else
    echo "== the C++/CUDA extension is NOT loaded: see build.log and info.txt; continuing with the other backends"
    grep -iE "error|warning: the c\+\+" "$OUT/build.log" 2>/dev/null | head -20
    export DSRB_DISABLE_EXT=1  # also when loading it crashed the interpreter: no later part tries again
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  echo "commit: ${DSRB_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo "unknown (pass DSRB_COMMIT)")}"
  python3 -m dsrb.info
  # On 2026-12-05 every cpu-kernel error whose message held a number crashed the process here (SIGSEGV): the host
  # compiler that built the extension and one such error, now formatted without std::ostream (csrc/checks.h).
  for c in ${CXX:+"$CXX"} c++ g++; do echo "compiler $c: $(command -v "$c") ($("$c" --version 2>&1 | head -1))"; done
  python3 -c "import torch, dsrb.ops; torch.ops.dsrb.prototype_bank_update_cpu(torch.zeros(2, 4, 3),
    torch.zeros(2, 4).long(), torch.ones(1, 2, 3), torch.ones(1, 2), torch.zeros(1, 2).long(), -1)" 2>/dev/null
  echo "a cpu-kernel error with a number in its message: exit $? (1: raised, as it should; 139: SIGSEGV)"
} 2>&1 | tee "$OUT/info.txt"

# 2. The GPU tests: the C++/CUDA and Triton backends against the oracles on the GPU, every test file with cases
#    for CUDA tensors (CI runs the rest on CPU), in 14 processes where pytest-xdist is installed (the image has it):
#    their time is mostly Triton's compilation of each kernel specialisation (single-threaded, CPU-bound; about 800
#    tests), and the host has 16 cores.
WORKERS=()
python3 -c "import xdist" 2>/dev/null && WORKERS=(-n "${DSRB_GPU_TEST_WORKERS:-14}")
part "GPU tests" 60 180 python3 -m pytest tests/test_ext_backends.py tests/test_triton_backend.py \
    tests/test_triton_blend.py tests/test_triton_semantic_attention.py tests/test_triton_edge_cases.py \
    tests/test_registry.py tests/test_autocast_double_backward.py tests/test_instance_blend.py \
    tests/test_prototype_bank_update.py tests/test_quadrant_index.py \
    tests/test_build.py::test_cuda_glue_finds_torchs_current_stream_function \
    tests/test_build.py::test_cuda_glue_gets_torchs_current_stream \
    tests/test_compiled_checks.py::test_cuda_compiled_check_is_a_device_side_assert tests/test_export.py \
    tests/test_backend_op_contract.py \
    "${WORKERS[@]}" -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -15

# 3. Each fused backend once at the target shapes, in a process of its own (benchmarks/preflight.py): one that
#    faults there would leave the CUDA context of a benchmark part unusable, failing every later case, so it is left
#    out of the benchmarks instead.
for backend in cuda triton; do
    echo "== preflight $backend" >>"$OUT/bench.log"
    if ! part "preflight $backend" 20 90 python3 -m benchmarks.preflight "$backend" >>"$OUT/bench.log" 2>&1; then
        echo "== $backend is left out of the benchmarks: its preflight failed (bench.log)" >&3
        LEFT_OUT="${LEFT_OUT:+$LEFT_OUT and }not $backend"
        SKIP+=(--skip "$backend")
    fi
done

# 4. The benchmarks, in the order of the targets: the ops at the issues' shapes, the training step, the largest
#    batch, the two torch.compile cases a target names (slow to compile, so after the quicker targets) and the head
#    path; the same fwd+bwd replayed from CUDA graphs; then the diagnosis of where
#    each op call goes, the other passes and shapes, the training step with a GPU user's settings (bf16,
#    channels-last, TF32), the prototype pass, the two no-gradient ops and the scaling sweep. Each part has a cap.
SIZE_TARGETS="coco or vg-b32 or tiny"  # tiny: the host cost of one call, which bounds every op at these sizes on a GPU
TARGET_SHAPES="coco or vg-b32"
if [ "$DSRB_BENCH_SIZE" = quick ]; then SIZE_TARGETS="coco-b8 or demo or tiny"; TARGET_SHAPES="coco-b8 or demo"; fi
SA=benchmarks/test_bench_semantic_attention.py
# The copy suite comes along: its graph cases (the device's bandwidth at each shape, what the blends' GB/s is read
# against) with the graph part, its plain copies with ops_rest.
OPS=("$SA" benchmarks/test_bench_instance_blend.py benchmarks/test_bench_prototype_blend.py
     benchmarks/test_bench_copy.py)
bench ops 40 150 "fwd+bwd and ($SIZE_TARGETS) and not compile" "${OPS[@]}"
# 60 rounds: on the H200 (2026-12-05) the steps' times fell by a third after 12-14 of 20 rounds.
DSRB_BENCH_ROUNDS=60 bench train_step 40 100 "not compile and not fast" benchmarks/test_bench_train_step.py
bench largest_batch 40 100 "not compile" benchmarks/test_bench_largest_batch.py
bench compile 40 150 "fwd+bwd and ($TARGET_SHAPES) and compile" "$SA::test_semantic_attention"
bench head 40 120 "fwd+bwd and not compile" benchmarks/test_bench_head.py
# The same fwd+bwd captured in a CUDA graph and replayed, every provider alike (the "graph" pass, conftest.run_case):
# the device's time without the host's, which the first GPU session found bounds every op at these shapes. The
# targets' cases first (the op alone and the head path's graph cases come with ops_rest and head_rest).
GRAPH="graph and ($SIZE_TARGETS) and not compile and not semantic_attention_op"
bench graph 30 100 "$GRAPH" "${OPS[@]}"
bench graph_compile 30 90 "graph and ($TARGET_SHAPES) and compile" "$SA::test_semantic_attention"
# Where those calls go (host vs device time, device events per call): benchmarks/profile_ops.py.
# tiny first: the host cost of one call, the row a cap would otherwise cut.
PROFILE_SHAPES=(--shape tiny --shape coco)
[ "$DSRB_BENCH_SIZE" = quick ] && PROFILE_SHAPES=(--shape tiny --shape coco-b8)
echo "== profile_ops ${PROFILE_SHAPES[*]} ${SKIP[*]}" >>"$OUT/bench.log"
part profile 20 60 python3 -m benchmarks.profile_ops "${PROFILE_SHAPES[@]}" "${SKIP[@]}" --out "$OUT/profile.md" \
    >>"$OUT/bench.log" 2>&1
bench compile_rest 30 90 "fwd+bwd and ($SIZE_TARGETS) and compile and not ($TARGET_SHAPES)" \
    "$SA::test_semantic_attention"
bench compile_op 30 90 "fwd+bwd and ($SIZE_TARGETS) and compile" "$SA::test_semantic_attention_op"
# Not what graph and graph_compile ran.
bench ops_rest 30 120 "not ($GRAPH) and not (graph and ($TARGET_SHAPES) and compile and semantic_attention and not \
semantic_attention_op) and (not (fwd+bwd and ($SIZE_TARGETS)) or (compile and not semantic_attention))" "${OPS[@]}"
bench head_rest 30 90 "not fwd+bwd or compile" benchmarks/test_bench_head.py
DSRB_BENCH_ROUNDS=60 bench train_step_fast 30 90 "fast and not compile" benchmarks/test_bench_train_step.py
# coco only: the official per-sample loop takes seconds per round there (2 s estimated), 2.5 times that at each VG
# shape.
PASS_SHAPES="coco"
[ "$DSRB_BENCH_SIZE" = quick ] && PASS_SHAPES="coco-b8 or demo"
bench prototype_pass 30 90 "$PASS_SHAPES" benchmarks/test_bench_prototype_pass.py
bench no_grad_ops 20 60 "" benchmarks/test_bench_quadrant_index.py benchmarks/test_bench_prototype_bank_update.py
bench scaling 30 90 "" benchmarks/test_bench_scaling.py

# 5. Only when asked (DSRB_GPU_SESSION_REST_TESTS=1): the rest of the test suite on this host (CPU paths, which CI
#    runs), after the GPU tests in tests.log. Left out by default, so the call ends when the benchmarks do and the
#    session keeps device time for a second call.
if [ "${DSRB_GPU_SESSION_REST_TESTS:-0}" = 1 ]; then
    echo "== the rest of the tests" >>"$OUT/tests.log"
    part "rest of the tests" 60 0 python3 -m pytest tests -q -rs -p no:cacheprovider \
        --ignore tests/test_ext_backends.py --ignore tests/test_triton_backend.py \
        --ignore tests/test_triton_blend.py --ignore tests/test_triton_semantic_attention.py \
        --ignore tests/test_registry.py --ignore tests/test_cuda_emulated.py \
        --ignore tests/test_autocast_double_backward.py --ignore tests/test_instance_blend.py \
        --ignore tests/test_prototype_bank_update.py --ignore tests/test_quadrant_index.py \
        --ignore tests/test_triton_edge_cases.py >>"$OUT/tests.log" 2>&1
    tail -3 "$OUT/tests.log" 2>/dev/null
fi

N_OUT=$(find "$OUT" -type f | wc -l)
((N_OUT > 8)) && echo "== ERROR: $N_OUT files under \$OUT, the device tool brings back 8: $(ls "$OUT")"
echo "== done in $((SECONDS - START)) s; targets:"
awk '/^### /{on = ($2 == "targets")} on' "$OUT/report.md" 2>/dev/null
