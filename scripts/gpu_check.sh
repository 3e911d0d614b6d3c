#!/usr/bin/env bash
# Every GPU check of the project in one call, for the device machine (one GPU; torch, transformers
# and accelerate installed; no internet, no model weights; at most 10 minutes a command):
#   1. the CUDA tests (tests/test_cuda.py: tiny models on cuda: W k* = v*, WilKE's argmin, fast =
#      reference, bfloat16 edits; AlphaEdit and ENCORE with NAS's anchor and UltraEdit writing what
#      they write on the CPU, GRACE and WISE answering from their memory with the weights untouched);
#   2. experiments.bench on randomly initialised models of the real shapes: GPT2-XL in float32
#      (WilKE edit fast vs reference, ROME edit, statistics tokens/s) and in bfloat16 (fast), and a
#      Llama-3-8B-shaped model in bfloat16 (WilKE fast, ROME, AlphaEdit, statistics tokens/s);
#   3. experiments.bench.batching on a Llama-3-8B-shaped model in bfloat16: MEMIT's z's one at a time
#      against batched (batches of 1, 16, 100 requests, 10 passes each, no early stop) and WilKE's
#      exact scan, candidates one at a time against one batch;
#   4. experiments.bench.wild: WILD answers generated batched against one prompt at a time
#      (Llama-3-8B shape, the answers compared).
# Everything it measures lands as JSON and logs under $OUT. Each step has its own time limit, so a
# slow one costs only itself; the exit status is 1 when any step failed.
#
#   OUT=/some/folder bash scripts/gpu_check.sh              # the real shapes, on the GPU (~9 minutes)
#   SHAPES=tiny OUT=/tmp/check bash scripts/gpu_check.sh    # the same steps on tiny shapes, any machine
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-$(mktemp -d)}"
SHAPES="${SHAPES:-real}"
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
mkdir -p "$OUT"
STATUS=0

step() {  # step NAME SECONDS COMMAND...: run it with a time limit, keep its log, show its tail
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most ${limit} s)"
    local start=$SECONDS
    if ! timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; then
        echo "!! $name failed or ran out of time; see $OUT/$name.log"
        STATUS=1
    fi
    echo "   $((SECONDS - start)) s"
    tail -n 6 "$OUT/$name.log"
}

"$PYTHON" - > "$OUT/environment.json" <<'PY'
import json, platform, torch, transformers
cuda = torch.cuda.is_available()
print(json.dumps({"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
                  "cuda": cuda, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
                  "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None}))
PY
cat "$OUT/environment.json"

if [ "$SHAPES" = tiny ]; then
    # tiny shapes are CI's check that every step runs: limits for a busy 2-core machine, not for speed
    GPT2=random:gpt2-tiny LLAMA=random:llama-tiny STATS=40 LIMITS=(120 300 180 240 180 180)
    BATCHING=(--model tiny --dtype float32 --batches 1,4 --steps 3)
    WILD_MODEL=random:llama-tiny
else
    # the whole script must fit one device command (10 minutes): 560 s of step limits
    GPT2=random:gpt2-xl LLAMA=random:llama-3-8b STATS=200 LIMITS=(90 120 60 150 90 50)
    BATCHING=(--model random:llama:32:4096 --dtype bfloat16 --batches 1,16,100 --steps 10)
    WILD_MODEL=random:llama-3-8b
fi
BENCH=("$PYTHON" -m experiments.bench --edits 1 --approx_edits 0 --stats_samples "$STATS")

step cuda_tests "${LIMITS[0]}" "$PYTHON" -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider
step bench_gpt2_float32 "${LIMITS[1]}" "${BENCH[@]}" --models "$GPT2" --dtype float32 --parts stats,wilke,rome \
    --json "$OUT/bench_gpt2_float32.json"
step bench_gpt2_bfloat16 "${LIMITS[2]}" "${BENCH[@]}" --models "$GPT2" --dtype bfloat16 --parts wilke,rome \
    --skip_reference --json "$OUT/bench_gpt2_bfloat16.json"
step bench_llama_bfloat16 "${LIMITS[3]}" "${BENCH[@]}" --models "$LLAMA" --dtype bfloat16 \
    --parts stats,wilke,rome,alphaedit --skip_reference --json "$OUT/bench_llama_bfloat16.json"
step batching "${LIMITS[4]}" "$PYTHON" -m experiments.bench.batching "${BATCHING[@]}" --scan_edits 1 \
    --json "$OUT/batching.json"
step wild "${LIMITS[5]}" "$PYTHON" -m experiments.bench.wild --model "$WILD_MODEL" --parts wild --timing_records 4 \
    --json "$OUT/wild.json"
echo "results in $OUT"
exit $STATUS
