#!/usr/bin/env bash
# One GPU session's standard measurements: the GPU tests, then every benchmark whose numbers docs/performance.md
# records, each writing JSON under OUT. Four parts, each under the device tool's 10-minute limit per call:
#   OUT=/some/dir bash loadtest/bench/gpu_suite.sh core      # GPU tests, decode, prefill (~6 min)
#   OUT=/some/dir bash loadtest/bench/gpu_suite.sh many      # 1,000 adapters on 64 slots + baseline (~6 min)
#   OUT=/some/dir bash loadtest/bench/gpu_suite.sh variants  # each LoRA path switched off, rank-64 slots (~6 min)
#   OUT=/some/dir bash loadtest/bench/gpu_suite.sh kernels   # LoRA kernel grid, LoRA added to the GEMMs per path (~4 min)
#   (no argument: all four; `first` = one call with the decisions first: LoRA paths' tests, decode, many;
#   `quick` = `first` without many, ~6 min, for a call with little device time left; `refresh` = engine GPU tests,
#   headline decode/prefill figures and the 1,000-adapter closed loop, ~5 min; `profile` = decode and prefill
#   kernel profiles with and without an adapter and the per-path layer cost, ~6 min; `next` = the async-decode
#   GPU test, then decode with LORAMUX_ASYNC_DECODE=1 and with the LoRA launch-shape knobs against the defaults, ~5 min;
#   `verify` = engine and sampling GPU tests, top-p decode with the torch and the fused sampler, 1,000 adapters,
#   decode profile, ~6.5 min; `partials` = LoRA GPU tests with LORAMUX_LORA_REDUCE_PARTIALS=1, decode with the
#   partials summed / with fewer splits against the defaults, ~6 min; `s9` = one call with the decisions first:
#   GPU tests of the sampling / slot-copy defaults, expand latency (bench_expand_latency) and decode with the
#   experimental LoRA switches against the defaults, the LoRA GPU tests with one-token tiles + tile table, ~9 min;
#   `s10` = the call after it: prefill kernel table, 1,000 adapters, LoRA cost per path, ~7 min; `one` = the
#   decisions of both in one call, ~10 min; `t1` = decode with T1 against the defaults and T1's LoRA GPU tests, ~3.5 min;
#   `s12` = session 11's changes: GPU tests with the new LoRA defaults, decode new vs old, prefill expand tile rows,
#   1,000 adapters, ~9.5 min)
# Run from the repository root with the package importable (pip install -e . or PYTHONPATH, see DESIGN.md §9).
set -u
OUT=${OUT:-out/gpu-suite}
mkdir -p "$OUT"
step() { local t=$1; shift; echo "== $*"; SECONDS=0; timeout "$t" "$@"; echo "== rc=$? in ${SECONDS}s"; }
B=loramux.loadtest.bench
PATHS_OFF="LORAMUX_LORA_OVERLAP=0 LORAMUX_FUSED_LORA_MLP=0 LORAMUX_FUSED_LORA_QKV=0"  # the session-6 LoRA paths off
PART=${1:-all}
if [ "$PART" = first ] || [ "$PART" = quick ]; then  # one call, the decisions first: the LoRA paths' GPU tests,
    # their decode beside the default paths, then (first only) 1,000 adapters with mixed-step graphs
step 200 python -m pytest -q -m gpu tests/test_lora_paths_gpu.py tests/test_attention_kernels_gpu.py \
    tests/test_engine_gpu.py tests/test_lora_kernels_gpu.py tests/test_many_adapters_gpu.py \
    -k "overlap or fused_gate or fused_qkv or table or mixed_step or rank_range or async" -p no:cacheprovider
step 90 env $PATHS_OFF python -m $B.bench_gpu_vs_peft --shape llama3-8b \
    --batch 32 --adapters 0,1,32 --skip-hf --json "$OUT/decode_b32_paths_off.json"
step 60 python -m $B.bench_gpu_vs_peft --shape llama3-8b --batch 32 --adapters 1,32 --skip-hf \
    --json "$OUT/decode_b32.json"
[ "$PART" = first ] && step 240 python -m $B.bench_many_adapters --shape llama3-8b --adapters 1000 \
    --ranks 8,16,32,64 --zipf 1.0 --max-loras 64 --max-cpu-loras 256 --max-cpu-lora-bytes 24000000000 --load 0.9 \
    --duration 20 --saturation-seconds 10 --mixed-graphs on --json "$OUT/many.json"
fi
if [ "$PART" = refresh ]; then  # one call after `first`: the 1,000-adapter closed loop, headline figures, tests
step 150 python -m $B.bench_many_adapters --shape llama3-8b --adapters 1000 --ranks 8,16,32,64 --zipf 1.0 \
    --max-loras 64 --max-cpu-loras 256 --max-cpu-lora-bytes 24000000000 --saturation-seconds 10 --closed-loop-only
step 70 python -m $B.bench_gpu_vs_peft --shape llama3-8b --batch 64 --adapters 0,64 --max-loras 64 --skip-hf \
    --json "$OUT/decode_b64.json"
step 70 python -m $B.bench_prefill --shape llama3-8b --prompt-len 2048 --json "$OUT/prefill.json"
step 70 python -m $B.bench_prefill --shape llama3-8b --prompt-len 2048 --graphs off --json "$OUT/prefill_eager.json"
step 100 python -m $B.bench_gpu_vs_peft --shape llama3-8b --batch 32 --adapters 0,1,8,32 --skip-hf \
    --json "$OUT/decode_b32.json"
step 150 python -m pytest -q -m gpu tests/test_engine_gpu.py tests/test_fused_ops_gpu.py -p no:cacheprovider
fi
if [ "$PART" = next ]; then  # session 7's unmeasured levers, each beside the defaults in the same call: decode steps
    # launched one ahead (LORAMUX_ASYNC_DECODE), the LoRA decode launch-shape knobs (kernels/lora_triton.py)
step 120 python -m pytest -q -m gpu tests/test_engine_gpu.py -k "async or graphs_equal" -p no:cacheprovider
step 60 python -m $B.bench_gpu_vs_peft --shape llama3-8b --batch 32 --adapters 0,1,32 --skip-hf --json "$OUT/d_base.json"
step 60 env LORAMUX_ASYNC_DECODE=1 python -m $B.bench_gpu_vs_peft --shape llama3-8b --batch 32 --adapters 0,1,32 \
    --skip-hf --json "$OUT/d_async.json"
step 50 env LORAMUX_LORA_DECODE_K_PER_SPLIT=128 LORAMUX_LORA_MAX_SPLITS=32 python -m $B.bench_gpu_vs_peft \
    --shape llama3-8b --batch 32 --adapters 1,32 --skip-hf --json "$OUT/d_split.json"
step 50 env LORAMUX_LORA_DECODE_K_PER_SPLIT=128 LORAMUX_LORA_MAX_SPLITS=32 LORAMUX_LORA_DECODE_N_ITERS=1 python -m \
    $B.bench_gpu_vs_peft --shape llama3-8b --batch 32 --adapters 1,32 --skip-hf --json "$OUT/d_split_n1.json"
for a in 0 1; do  # batch 64, synchronous then launched one ahead
    step 60 env LORAMUX_ASYNC_DECODE=$a python -m $B.bench_gpu_vs_peft --shape llama3-8b --batch 64 --adapters 0,64 \
        --max-loras 64 --skip-hf --json "$OUT/d64_async$a.json"
done
fi
if [ "$PART" = verify ]; then  # the engine and sampling GPU tests, top-p decode with the torch and the fused
    # sampler, then 1,000 adapters and a decode profile (steps launched ahead and fused sampling are the CUDA defaults)
step 130 python -m pytest -q -m gpu tests/test_engine_gpu.py tests/test_sampling_kernel.py -p no:cacheprovider
for f in 0 auto; do
    step 55 env LORAMUX_FUSED_SAMPLING=$f python -m $B.bench_gpu_vs_peft --shape llama3-8b --batch 32 --adapters 0,32 \
        --temperature 0.8 --top-p 0.9 --skip-hf --json "$OUT/d_top_p_fused_$f.json"
done
step 200 python -m $B.bench_many_adapters --shape llama3-8b --adapters 1000 \
    --ranks 8,16,32,64 --zipf 1.0 --max-loras 64 --max-cpu-loras 256 --max-cpu-lora-bytes 24000000000 --load 0.9 \
    --duration 20 --saturation-seconds 10 --mixed-graphs on --json "$OUT/many_async.json"
step 90 python -m $B.bench_gpu_vs_peft --shape llama3-8b --batch 32 --adapters 0,1 --skip-hf --profile
fi
if [ "$PART" = s9 ]; then  # one call for session 9's scarce device time, decisions first: expand latency per
    # suspect and with one-token tiles from the tile table (T1), decode with T1 beside the defaults, the GPU tests of
    # session 8's unmeasured defaults (top-p rows on the fused sampler, slot copies issued while waiting), the LoRA
    # GPU tests with T1, each switch alone, top-p decode torch vs fused sampler (~9 min; the last steps are the
    # first to go if the call runs out)
T1="LORAMUX_LORA_TILE_TABLE=1 LORAMUX_LORA_EXPAND_BM1=1"
step 70 python -m $B.bench_expand_latency --json "$OUT/expand_latency.json"
step 50 env $T1 python -m $B.bench_expand_latency --json "$OUT/expand_latency_t1.json"
step 60 python -m $B.bench_gpu_vs_peft --shape llama3-8b --batch 32 --adapters 0,1,32 --skip-hf --json "$OUT/p_base.json"
step 50 env $T1 python -m $B.bench_gpu_vs_peft --shape llama3-8b --batch 32 --adapters 1,32 --skip-hf \
    --json "$OUT/p_t1.json"
step 120 python -m pytest -q -m gpu tests/test_sampling_kernel.py \
    tests/test_many_adapters_gpu.py tests/test_engine_gpu.py -k "gpu_kernel or gpu_at or copy or churn or async" \
    -p no:cacheprovider
step 100 env $T1 python -m pytest -q -m gpu tests/test_lora_kernels_gpu.py tests/test_lora_paths_gpu.py \
    tests/test_engine_gpu.py -k "not bf16_logits and not mixed_step and not async" -p no:cacheprovider
for v in LORAMUX_LORA_TILE_TABLE LORAMUX_LORA_EXPAND_BM1 LORAMUX_LORA_TILES_SLOW LORAMUX_LORA_REDUCE_PARTIALS; do
    step 50 env $v=1 python -m $B.bench_gpu_vs_peft --shape llama3-8b --batch 32 --adapters 1,32 --skip-hf \
        --json "$OUT/p_$v.json"
done
for f in LORAMUX_FUSED_SAMPLING=0 LORAMUX_FUSED_SAMPLING=auto; do  # top-p: torch; sort bound + fused
    # noise/argmax (the default)
    step 45 env $f python -m $B.bench_gpu_vs_peft --shape llama3-8b --batch 32 --adapters 0 \
        --temperature 0.8 --top-p 0.9 --skip-hf --json "$OUT/d_top_p_${f//=/_}.json"
done
fi
if [ "$PART" = t1 ]; then  # the shortest decision call (~3.5 min): decode with one-token tiles from the tile table
    # (T1) beside the defaults, then T1's LoRA GPU tests
T1="LORAMUX_LORA_TILE_TABLE=1 LORAMUX_LORA_EXPAND_BM1=1"
step 50 python -m $B.bench_gpu_vs_peft --shape llama3-8b --batch 32 --adapters 1,32 --skip-hf --json "$OUT/p_base.json"
step 50 env $T1 python -m $B.bench_gpu_vs_peft --shape llama3-8b --batch 32 --adapters 1,32 --skip-hf \
    --json "$OUT/p_t1.json"
step 100 env $T1 python -m pytest -q -m gpu tests/test_lora_kernels_gpu.py tests/test_lora_paths_gpu.py \
    -p no:cacheprovider
fi
if [ "$PART" = one ]; then  # s9 + s10's decisions in one call, for a session that may get a single one: decode
    # with one-token tiles from the tile table (T1) against the defaults, T1's LoRA GPU tests, the GPU tests of
    # session 8's defaults, the prefill kernel table, expand latency, top-p decode with the searched bound
T1="LORAMUX_LORA_TILE_TABLE=1 LORAMUX_LORA_EXPAND_BM1=1"
step 60 python -m $B.bench_gpu_vs_peft --shape llama3-8b --batch 32 --adapters 0,1,32 --skip-hf --json "$OUT/p_base.json"
step 50 env $T1 python -m $B.bench_gpu_vs_peft --shape llama3-8b --batch 32 --adapters 1,32 --skip-hf \
    --json "$OUT/p_t1.json"
step 100 env $T1 python -m pytest -q -m gpu tests/test_lora_kernels_gpu.py tests/test_lora_paths_gpu.py \
    tests/test_engine_gpu.py -k "not bf16_logits and not mixed_step and not async" -p no:cacheprovider
step 120 python -m pytest -q -m gpu tests/test_sampling_kernel.py \
    tests/test_many_adapters_gpu.py tests/test_engine_gpu.py -k "gpu_kernel or gpu_at or copy or churn or async" \
    -p no:cacheprovider
step 100 python -m $B.bench_prefill --shape llama3-8b --prompt-len 2048 --repeats 2 --profile \
    --json "$OUT/prefill_profile.json"
step 60 env LORAMUX_LORA_OVERLAP=0 python -m $B.bench_prefill --shape llama3-8b --prompt-len 2048 --repeats 3 \
    --json "$OUT/prefill_no_overlap.json"  # does the side-stream shrink slow the compute-bound prefill GEMMs?
step 70 python -m $B.bench_expand_latency --json "$OUT/expand_latency.json"
step 50 env $T1 python -m $B.bench_expand_latency --json "$OUT/expand_latency_t1.json"
for f in LORAMUX_FUSED_SAMPLING=0 LORAMUX_FUSED_SAMPLING=auto; do
    step 45 env $f python -m $B.bench_gpu_vs_peft --shape llama3-8b --batch 32 --adapters 0 \
        --temperature 0.8 --top-p 0.9 --skip-hf --json "$OUT/d_top_p_${f//=/_}.json"
done
fi
if [ "$PART" = s12 ]; then  # session 11's changes, decisions first (~9.5 min): the LoRA / engine GPU tests with the
    # new defaults (one-token expand tiles from the table, partials summed by an ordered launch), decode against the
    # old defaults, prefill TTFT with 32- and 16-row expand tiles, 1,000 adapters with copies that wait only for the
    # steps reading their slot, then the prefill kernel table with 16-row tiles and unoverlapped shrinks
OLD="LORAMUX_LORA_TILE_TABLE=0 LORAMUX_LORA_EXPAND_BM1=0 LORAMUX_LORA_REDUCE_PARTIALS=0"
step 170 python -m pytest -q -m gpu tests/test_lora_kernels_gpu.py tests/test_lora_paths_gpu.py tests/test_engine_gpu.py \
    -k "not bf16_logits" -p no:cacheprovider
step 70 python -m $B.bench_gpu_vs_peft --shape llama3-8b --batch 32 --adapters 0,1,32 --skip-hf --json "$OUT/p_new.json"
step 45 env $OLD python -m $B.bench_gpu_vs_peft --shape llama3-8b --batch 32 --adapters 1,32 --skip-hf \
    --json "$OUT/p_old.json"
for bm in 64 32 16; do  # lora_meta.PREFILL_EXPAND_BM: registers per thread 224/118/72 (expand), 182/170/104 (+SiLU)
    step 30 env LORAMUX_LORA_PREFILL_EXPAND_BM=$bm python -m $B.bench_prefill --shape llama3-8b --prompt-len 2048 \
        --repeats 3 --json "$OUT/prefill_bm$bm.json"
done
step 200 python -m $B.bench_many_adapters --shape llama3-8b --adapters 1000 --ranks 8,16,32,64 --zipf 1.0 \
    --max-loras 64 --max-cpu-loras 256 --max-cpu-lora-bytes 24000000000 --load 0.9 --duration 20 \
    --saturation-seconds 10 --mixed-graphs on --json "$OUT/many.json"
# the kernel table with 16-row expand tiles and the shrinks on the main stream: their time alone, not shared with
# the GEMMs they overlap by default
step 60 env LORAMUX_LORA_PREFILL_EXPAND_BM=16 LORAMUX_LORA_OVERLAP=0 python -m $B.bench_prefill --shape llama3-8b \
    --prompt-len 2048 --repeats 2 --profile
fi
if [ "$PART" = s10 ]; then  # the call after s9: where the 2048-token prefill's LoRA time goes (kernel table by
    # category without and with an adapter, never run before), 1,000 adapters with slot copies issued while a step's
    # tokens are awaited (session 8, unmeasured), then each LoRA path's cost added to its GEMM (~7 min)
step 100 python -m $B.bench_prefill --shape llama3-8b --prompt-len 2048 --repeats 2 --profile \
    --json "$OUT/prefill_profile.json"
step 220 python -m $B.bench_many_adapters --shape llama3-8b --adapters 1000 --ranks 8,16,32,64 --zipf 1.0 \
    --max-loras 64 --max-cpu-loras 256 --max-cpu-lora-bytes 24000000000 --load 0.9 --duration 20 \
    --saturation-seconds 10 --mixed-graphs on --json "$OUT/many.json"
step 120 python -m $B.bench_lora_linear --rank 16 --json "$OUT/lora_linear.json"
fi
if [ "$PART" = partials ]; then  # does the expand's split-K partial reduction cost the decode LoRA time? (session 8)
    # expand latency per suspect (bench_expand_latency), the LoRA GPU tests with the partials summed beside the
    # shrink, then decode: defaults, summed, fewer splits
step 90 python -m $B.bench_expand_latency --json "$OUT/expand_latency.json"
step 120 env LORAMUX_LORA_REDUCE_PARTIALS=1 python -m pytest -q -m gpu tests/test_lora_paths_gpu.py \
    tests/test_lora_kernels_gpu.py -p no:cacheprovider
step 70 env LORAMUX_LORA_REDUCE_PARTIALS=1 python -m pytest -q -m gpu tests/test_engine_gpu.py \
    -k "fp32_equals_cpu or cuda_graphs_equal_eager" -p no:cacheprovider
step 60 python -m $B.bench_gpu_vs_peft --shape llama3-8b --batch 32 --adapters 0,1,32 --skip-hf --json "$OUT/p_base.json"
step 50 env LORAMUX_LORA_REDUCE_PARTIALS=1 python -m $B.bench_gpu_vs_peft --shape llama3-8b --batch 32 --adapters 1,32 \
    --skip-hf --json "$OUT/p_reduce.json"
step 50 env LORAMUX_LORA_DECODE_K_PER_SPLIT=4096 python -m $B.bench_gpu_vs_peft --shape llama3-8b --batch 32 \
    --adapters 1,32 --skip-hf --json "$OUT/p_fewer_splits.json"
step 50 env LORAMUX_LORA_REDUCE_PARTIALS=1 python -m $B.bench_gpu_vs_peft --shape llama3-8b --batch 64 --adapters 0,64 \
    --max-loras 64 --skip-hf --json "$OUT/p_reduce_b64.json"
fi
if [ "$PART" = profile ]; then  # where a decode step's LoRA time goes (D = 0 vs 1, kernel table), per-path layer cost
step 120 python -m $B.bench_gpu_vs_peft --shape llama3-8b --batch 32 --adapters 0,1 --skip-hf --profile
step 90 python -m $B.bench_prefill --shape llama3-8b --prompt-len 2048 --repeats 2 --profile
step 150 python -m $B.bench_lora_linear --rank 16 --json "$OUT/lora_linear.json"
fi
if [ "$PART" = core ] || [ "$PART" = all ]; then
step 230 python -m pytest -q -m gpu tests/test_engine_gpu.py tests/test_fused_ops_gpu.py \
    tests/test_many_adapters_gpu.py tests/test_attention_kernels_gpu.py tests/test_lora_paths_gpu.py \
    -p no:cacheprovider
step 100 python -m $B.bench_gpu_vs_peft --shape llama3-8b --batch 32 --adapters 0,1,8,32 --skip-hf \
    --json "$OUT/decode_b32.json"
step 70 python -m $B.bench_gpu_vs_peft --shape llama3-8b --batch 64 --adapters 0,64 --max-loras 64 --skip-hf \
    --json "$OUT/decode_b64.json"
step 70 python -m $B.bench_prefill --shape llama3-8b --prompt-len 2048 --json "$OUT/prefill.json"
step 70 python -m $B.bench_prefill --shape llama3-8b --prompt-len 2048 --graphs off --json "$OUT/prefill_eager.json"
fi
if [ "$PART" = variants ] || [ "$PART" = all ]; then  # LoRA paths switched off, each beside its own base in the run
    for v in LORAMUX_LORA_OVERLAP LORAMUX_FUSED_LORA_MLP LORAMUX_FUSED_LORA_QKV; do  # each path off alone
        step 70 env $v=0 python -m $B.bench_gpu_vs_peft --shape llama3-8b --batch 32 --adapters 0,1,32 --skip-hf \
            --json "$OUT/decode_b32_$v.json"
    done
    step 70 env $PATHS_OFF python -m $B.bench_gpu_vs_peft --shape llama3-8b \
        --batch 32 --adapters 0,1,32 --skip-hf --json "$OUT/decode_b32_paths_off.json"
    step 50 python -m $B.bench_gpu_vs_peft --shape llama3-8b --batch 1 --adapters 0,1 --max-loras 1 --skip-hf \
        --json "$OUT/decode_b1.json"
    # r=16 adapters in rank-64 slots (the server default; compact B blocks should make it match rank-16 slots)
    step 70 python -m $B.bench_gpu_vs_peft --shape llama3-8b --batch 32 --adapters 1,32 --max-lora-rank 64 \
        --skip-hf --json "$OUT/decode_b32_slot_rank64.json"
    step 70 env LORAMUX_FUSED_LORA_MLP=0 LORAMUX_FUSED_LORA_QKV=0 python -m $B.bench_prefill --shape llama3-8b \
        --prompt-len 2048 --json "$OUT/prefill_unfused_expands.json"
fi
if [ "$PART" = kernels ] || [ "$PART" = all ]; then
step 120 python -m $B.bench_lora_kernels --grid --ranks 8,16,64 --json "$OUT/lora_grid.json"
step 150 python -m $B.bench_lora_linear --rank 16 --json "$OUT/lora_linear.json"  # added to the GEMMs, per path
fi
if [ "$PART" = many ] || [ "$PART" = all ]; then
    MANY="--shape llama3-8b --adapters 1000 --ranks 8,16,32,64 --zipf 1.0 --max-loras 64 --max-cpu-loras 256
        --max-cpu-lora-bytes 24000000000 --load 0.9 --duration 20 --saturation-seconds 10"
    # the server's paths (packed adapter files on), with mixed-step graphs; then the session-3 baseline
    step 240 python -m $B.bench_many_adapters $MANY --mixed-graphs on --json "$OUT/many.json"
    step 140 python -m $B.bench_many_adapters $MANY --packed-cache off --mixed-graphs off --closed-loop-only \
        --json "$OUT/many_baseline.json"
fi
