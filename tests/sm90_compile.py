"""Compile every Triton kernel of loramux for an H100 (sm_90) on a machine without a GPU.

Run as a script (its own interpreter: it swaps Triton's active driver):
`python tests/sm90_compile.py [--quick] [--shard I/N]` (every N-th call from the I-th) prints one JSON object
{"compiled": [[kernel, shared bytes, warps, stages, registers, spill bytes, call], ...], "failed": [[call, error]]}.
How: a stand-in driver reports an sm_90 CUDA target, and JITFunction.run is forced into warmup mode, so each
launch made by the real wrapper functions (CPU tensors of real model shapes, uninitialised) compiles to a cubin
with the bundled ptxas and is never launched. This catches what the interpreter cannot: Triton compile errors,
unsupported constructs, shared memory past the 227 KiB an H100 block can have. Launch plans that read the SM
count see 132 (H100 SXM), as on the device.
"""
from __future__ import annotations

import functools
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import traceback

import torch

SM90_MAX_SHARED = 232448  # bytes per block with opt-in (227 KiB)
SHAPES = {  # name: (hidden, heads, kv heads, head dim, intermediate)
    "llama3-8b": (4096, 32, 8, 128, 14336),
    "llama3.2-1b": (2048, 32, 8, 64, 8192),
}


@functools.lru_cache(maxsize=None)
def resources(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, local memory bytes per thread = spills) of a cubin, from the bundled cuobjdump."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out)
    return int(m.group(1)), int(m.group(2)) + int(m.group(3))


def install_fake_driver() -> list:
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    class Sm90:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

    compiled = []
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        k = run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append([self.fn.__name__, k.metadata.shared, k.metadata.num_warps, k.metadata.num_stages,
                         *resources(k.asm["cubin"])])
        return k

    driver.set_active(Sm90())
    JITFunction.run = compile_only
    return compiled


def lora_calls(quick: bool):
    from loramux.kernels import lora, lora_fused_triton, lora_mlp_triton, lora_qkv_triton, lora_triton

    S = 64
    for name, (h, nh, nkv, d, inter) in SHAPES.items():
        groups = [(h, (nh * d, nkv * d, nkv * d)), (nh * d, (h,)), (h, (inter, inter)), (inter, (h,))]
        Ts = (1, 32, 256, 2048) if quick else (1, 8, 32, 64, 100, 256, 512, 2048, 4096, 8192)
        dtypes = (torch.bfloat16,) if name != "llama3-8b" else (torch.bfloat16, torch.float16, torch.float32)
        for (K, widths), T, dtype, R in itertools.product(groups, Ts, dtypes, (16, 64, 256)):
            if (R != 64 or dtype != torch.bfloat16) and (T not in (1, 32, 2048) or name != "llama3-8b"):
                continue  # other ranks and dtypes: the big shape, decode and prefill sizes
            if quick and dtype != torch.bfloat16 and (T != 32 or R != 64):
                continue
            offs = tuple(itertools.accumulate((0, *widths)))
            L, N = len(widths), offs[-1]
            x, y = torch.empty(T, K, dtype=dtype), torch.empty(T, N, dtype=dtype)
            a, b = torch.empty(S, L * R, K, dtype=dtype), torch.empty(S, N, R, dtype=dtype)
            ranks, scales = torch.zeros(S, L, dtype=torch.int32), torch.zeros(S, L)
            meta = lora.LoRAMeta.empty(T, S, "cpu")
            meta.num_tokens = T
            tag = f"lora {name} K={K} N={N} T={T} R={R} {dtype}"
            yield tag, lambda: lora_triton.add_lora(y, x, a, b, ranks, scales, offs, meta, fused=False)
            if T <= 64:
                yield tag + " fused", lambda: lora_fused_triton.fused_add_lora(y, x, a, b, ranks, scales, offs, meta)
            if widths == (nh * d, nkv * d, nkv * d):
                kc, pos, cos = torch.empty(64, 16, nkv, d, dtype=dtype), torch.zeros(T, dtype=torch.int64), \
                    torch.empty(8192, d)
                yield tag + " expand+rope", lambda: lora_qkv_triton.expand_rope_kv(
                    y, lora_triton.new_partials(x, a, ranks), b, ranks, scales, meta, pos, cos, cos, kc, kc, pos, nh,
                    nkv, d)
            if widths == (inter, inter):
                yield tag + " expand+silu", lambda: lora_mlp_triton.expand_silu(
                    y, lora_triton.new_partials(x, a, ranks), b, ranks, scales, meta)


def attention_calls(quick: bool):
    from loramux.kernels import attention_prefill_triton as pre, attention_triton as att

    for name, (h, nh, nkv, d, _) in SHAPES.items():
        for dtype, window in itertools.product((torch.bfloat16, torch.float16, torch.float32), (None, 4096)):
            if quick and dtype == torch.float32:
                continue
            kc = torch.empty(64, 16, nkv, d, dtype=dtype)
            tag = f"attention {name} {dtype} window={window}"
            for B in (1, 32, 256):
                q, bt, sl = torch.empty(B, nh, d, dtype=dtype), torch.zeros(B, 512, dtype=torch.int32), \
                    torch.zeros(B, dtype=torch.int32)
                yield f"{tag} decode B={B}", lambda: att.decode(q, kc, kc, bt, sl, 0.1, window)
            for T, maxq in ((2048, 2048), (300, 8)):
                q, bt, sl = torch.empty(T, nh, d, dtype=dtype), torch.zeros(4, 512, dtype=torch.int32), \
                    torch.zeros(4, dtype=torch.int32)
                cu = torch.zeros(5, dtype=torch.int32)
                yield f"{tag} prefill T={T}", lambda: pre.prefill(q, kc, kc, bt, sl, cu, maxq, 0.1, window)
                work = torch.zeros(64, 2, dtype=torch.int32)
                yield f"{tag} table T={T}", lambda: pre.prefill_graphed(q, kc, kc, bt, sl, cu, work, 0.1, window)
            k = torch.empty(32, nkv, d, dtype=dtype)
            yield f"{tag} write_kv", lambda: att.write_kv(k, k, kc, kc, torch.zeros(32, dtype=torch.int64))


def small_op_calls(quick: bool):
    from loramux.kernels import fused_ops_triton as fo, rope_kv_triton as rk

    for name, (h, nh, nkv, d, inter) in SHAPES.items():
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            x, w = torch.empty(32, h, dtype=dtype), torch.empty(h, dtype=dtype)
            yield f"rms_norm {name} {dtype}", lambda: fo.rms_norm(x, w, 1e-5, x)
            yield f"rms_norm {name} {dtype} first", lambda: fo.rms_norm(x, w, 1e-5, None)
            gu = torch.empty(32, 2 * inter, dtype=dtype)
            yield f"silu_mul {name} {dtype}", lambda: fo.silu_mul(gu)
            qkv, kc = torch.empty(32, (nh + 2 * nkv) * d, dtype=dtype), torch.empty(64, 16, nkv, d, dtype=dtype)
            pos, cos = torch.zeros(32, dtype=torch.int64), torch.empty(8192, d)
            yield f"rope_kv {name} {dtype}", lambda: rk.rope_write_kv(qkv, pos, cos, cos, kc, kc, pos, nh, nkv, d)
    from loramux.kernels.sampling_triton import gumbel_argmax
    logits, meta = torch.empty(32, 128256), torch.zeros(32, 7, dtype=torch.float64)
    yield "gumbel_argmax fp32", lambda: gumbel_argmax(logits, meta, torch.zeros(32))


def main(quick: bool, shard: int = 0, shards: int = 1) -> dict:
    compiled = install_fake_driver()
    from loramux.kernels import attention_triton, lora_triton

    lora_triton._num_sms = attention_triton._num_sms = lambda device: 132
    failed = []
    calls = itertools.chain(lora_calls(quick), attention_calls(quick), small_op_calls(quick))
    for i, (tag, call) in enumerate(calls):
        if i % shards != shard:
            continue
        n = len(compiled)
        try:
            call()
            for c in compiled[n:]:
                c.append(tag)
        except Exception as e:  # noqa: BLE001 - every failure is reported, the run goes on
            failed.append([tag, f"{type(e).__name__}: {e}"[:2000] + traceback.format_exc(limit=3)[-1500:]])
    return {"compiled": compiled, "failed": failed}


if __name__ == "__main__":  # [--quick] [--shard I/N]
    i, n = map(int, sys.argv[sys.argv.index("--shard") + 1].split("/")) if "--shard" in sys.argv else (0, 1)
    print(json.dumps(main("--quick" in sys.argv, i, n)))
