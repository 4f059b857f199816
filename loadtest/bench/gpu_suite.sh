#!/usr/bin/env bash
# One GPU session's standard measurements, in one command (about 7 minutes on an H100; fits one `device` call):
# the GPU tests, then every benchmark whose numbers docs/performance.md records, each writing JSON under OUT.
#   OUT=/some/dir bash loadtest/bench/gpu_suite.sh [quick]      ("quick": skip the many-adapter run)
# Run from the repository root with the package importable (pip install -e . or PYTHONPATH, see DESIGN.md §9).
set -u
OUT=${OUT:-out/gpu-suite}
mkdir -p "$OUT"
step() { local t=$1; shift; echo "== $*"; SECONDS=0; timeout "$t" "$@"; echo "== rc=$? in ${SECONDS}s"; }
B=loramux.loadtest.bench
step 200 python -m pytest -q -m gpu tests/test_engine_gpu.py tests/test_fused_ops_gpu.py \
    tests/test_many_adapters_gpu.py -p no:cacheprovider
step 100 python -m $B.bench_gpu_vs_peft --shape llama3-8b --batch 32 --adapters 0,1,8,32 --skip-hf \
    --json "$OUT/decode_b32.json"
step 70 python -m $B.bench_gpu_vs_peft --shape llama3-8b --batch 64 --adapters 0,64 --max-loras 64 --skip-hf \
    --json "$OUT/decode_b64.json"
step 70 python -m $B.bench_prefill --shape llama3-8b --prompt-len 2048 --json "$OUT/prefill.json"
if [ "${1:-}" != quick ]; then
    step 180 python -m $B.bench_many_adapters --shape llama3-8b --adapters 1000 --ranks 8,16,32,64 --zipf 1.0 \
        --max-loras 64 --max-cpu-loras 256 --max-cpu-lora-bytes 24000000000 --load 0.9 --duration 20 \
        --saturation-seconds 10 --json "$OUT/many.json"
fi
