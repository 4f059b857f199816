"""Multi-LoRA public API: per-step metadata (tokens grouped by slot), shrink/expand/add_lora, backend dispatch."""
from __future__ import annotations

import os
from functools import lru_cache

import torch

from . import lora_reference as _ref
from .backend import resolve
from .lora_meta import LoRAMeta, build_lora_meta  # noqa: F401  (re-exported: the public API)


def resolve_backend(name: str, device: torch.device | str) -> str:
    """"auto" | "triton" | "torch" -> "triton" | "torch"; env LORAMUX_KERNEL_BACKEND overrides "auto"."""
    return resolve(name, device, "LORAMUX_KERNEL_BACKEND", "kernel")


def _tri():
    from . import lora_triton  # imported lazily: CPU installs without triton never import it

    return lora_triton


def _check(x, a_stack, ranks, meta) -> tuple[int, int]:
    """-> (L, R); validates shapes and dtypes (host metadata only, no sync)."""
    if x.dim() != 2 or a_stack.dim() != 3 or ranks.dim() != 2:
        raise ValueError("expected x [T, K], a_stack [S, L*R, K], ranks [S, L]")
    S, L = ranks.shape
    if a_stack.shape[0] != S or a_stack.shape[2] != x.shape[1] or a_stack.shape[1] % L:
        raise ValueError(f"a_stack {tuple(a_stack.shape)} does not fit x {tuple(x.shape)}, ranks {tuple(ranks.shape)}")
    if x.dtype != a_stack.dtype:
        raise TypeError(f"x is {x.dtype} but a_stack is {a_stack.dtype}")
    if meta.num_slots != S or meta.num_tokens != x.shape[0]:
        raise ValueError(f"meta is for T={meta.num_tokens}, S={meta.num_slots}; got T={x.shape[0]}, S={S}")
    return L, a_stack.shape[1] // L


def _check_expand(y, b_stack, ranks, scales, slice_offsets, R) -> None:
    L = ranks.shape[1]
    if len(slice_offsets) != L + 1 or slice_offsets[0] != 0 or slice_offsets[-1] != y.shape[1]:
        raise ValueError(f"slice_offsets {slice_offsets} must be {L + 1} ints from 0 to N={y.shape[1]}")
    if L > 4:
        raise ValueError("at most 4 slices per linear group")
    if tuple(b_stack.shape) != (ranks.shape[0], y.shape[1], R) or tuple(scales.shape) != tuple(ranks.shape):
        raise ValueError(f"b_stack {tuple(b_stack.shape)} / scales {tuple(scales.shape)} do not fit "
                         f"y {tuple(y.shape)}, ranks {tuple(ranks.shape)}, R={R}")
    if y.dtype != b_stack.dtype:
        raise TypeError(f"y is {y.dtype} but b_stack is {b_stack.dtype}")


def _prep(ranks, scales):
    return ranks.to(torch.int32).contiguous(), scales.to(torch.float32).contiguous()  # no-ops normally


def _tri_layout(x, y, a_stack, b_stack):
    """Triton path wants unit inner strides (x and y may have any row stride: views of wider buffers)."""
    if y is not None and y.stride(1) != 1:
        raise ValueError("y must have a unit stride in its last dimension (it is updated in place)")
    x = x if x is None or x.stride(1) == 1 else x.contiguous()
    a_stack = a_stack if a_stack is None else a_stack.contiguous()  # no-op for slot stacks (allocated whole)
    return x, a_stack, (b_stack if b_stack is None else b_stack.contiguous())


def lora_shrink(x, a_stack, ranks, meta, out=None, backend="auto") -> torch.Tensor:
    """x [T, K] @ A^T -> fp32 [T, L*R]. out[t, i*R + j] is written only for slot(t) >= 0 and j < ranks[slot, i];
    other cells keep their contents (zeros when out is None, as a fresh zeroed buffer is returned)."""
    L, R = _check(x, a_stack, ranks, meta)
    ranks = ranks.to(torch.int32)
    T = x.shape[0]
    if out is None:
        out = torch.zeros(T, L * R, dtype=torch.float32, device=x.device)
    elif out.shape != (T, L * R) or out.dtype != torch.float32:
        raise ValueError(f"out must be fp32 [{T}, {L * R}]")
    if resolve_backend(backend, x.device) == "torch":
        _ref.shrink(x, a_stack, ranks, meta, out)
    else:
        tri = _tri()
        x, a_stack, _ = _tri_layout(x, None, a_stack, None)
        out3 = out.unsqueeze(0) if out.is_contiguous() else torch.empty_like(out).unsqueeze(0)
        tri.shrink(x, a_stack, ranks.contiguous(), meta, out3, tri.shrink_plan(T, x.shape[1], L, R, x.device, 1))
        if out3.data_ptr() != out.data_ptr():
            out.copy_(out3[0])  # rare: non-contiguous out
    return out


def lora_expand(y, buf, b_stack, ranks, scales, slice_offsets, meta, backend="auto") -> None:
    """In place: y[t, off_i:off_i+1] += scales[s, i] * buf[t, i*R : i*R+rank] @ B_si^T for s = slot(t) >= 0, with
    B_si = lora_layout.b_block(b_stack[s], off_i, off_i+1, rank) [w_i, rank] (compact blocks: lora_layout.py;
    pack_b builds a stack from plain [S, N, R] matrices). buf: fp32 [T, L*R] as returned by lora_shrink."""
    R = b_stack.shape[2] if b_stack.dim() == 3 else -1
    _check_expand(y, b_stack, ranks, scales, tuple(slice_offsets), R)
    if buf.shape != (y.shape[0], ranks.shape[1] * R) or buf.dtype != torch.float32:
        raise ValueError(f"buf must be fp32 [{y.shape[0]}, {ranks.shape[1] * R}]")
    if meta.num_slots != ranks.shape[0] or meta.num_tokens != y.shape[0]:
        raise ValueError("meta does not match y / ranks")
    ranks, scales = _prep(ranks, scales)
    if resolve_backend(backend, y.device) == "torch":
        _ref.expand(y, buf, b_stack, ranks, scales, tuple(slice_offsets), meta)
    else:
        _, _, b_stack = _tri_layout(None, y, None, b_stack)
        _tri().expand(y, buf.contiguous().unsqueeze(0), b_stack, ranks, scales, tuple(slice_offsets), meta)


def add_lora(y, x, a_stack, b_stack, ranks, scales, slice_offsets, meta, backend="auto", *,
             split_k: int | None = None, fused: bool | None = None) -> None:
    """In place, for every token t with s = token_slots[t] >= 0 and every slice i:
    y[t, off_i:off_i+1] += scales[s, i] * (x[t] @ a_stack[s, i*R : i*R+ranks[s, i]].T) @ B_si.T
    with B_si = lora_layout.b_block(b_stack[s], off_i, off_i+1, ranks[s, i]) (see lora_expand).
    Triton: one fused launch for decode-sized T, else one shrink and one expand launch; padding beyond each rank
    is never read. fused (Triton only): True / False forces the fused / two-launch path, None = heuristic.
    split_k (Triton, two-launch path only) overrides the split-K heuristic; partial sums are reduced in a fixed
    order (deterministic, no atomics)."""
    L, R = _check(x, a_stack, ranks, meta)
    _check_expand(y, b_stack, ranks, scales, tuple(slice_offsets), R)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"y has {y.shape[0]} rows, x has {x.shape[0]}")
    ranks, scales = _prep(ranks, scales)
    if resolve_backend(backend, x.device) == "torch":
        _ref.add_lora(y, x, a_stack, b_stack, ranks, scales, tuple(slice_offsets), meta)
        return
    x, a_stack, b_stack = _tri_layout(x, y, a_stack, b_stack)
    _tri().add_lora(y, x, a_stack, b_stack, ranks, scales, tuple(slice_offsets), meta, split_k, fused)


def _switch(name: str) -> bool:
    """On unless the environment variable is "0" (each path measured on the H100, docs/performance.md)."""
    return os.environ.get(name, "1") != "0"


# The shrink reads only x, so it runs on a side stream while the base GEMM (which it does not depend on) runs;
# the expand joins both. Decode shrinks take ~8-10 us each on the H100 (session-7 profile), mostly still exposed.
OVERLAP = _switch("LORAMUX_LORA_OVERLAP")
# gate|up expand + SiLU*mul in one kernel (gate_up_silu; lora_mlp_triton.py), q|k|v expand + RoPE + KV write in
# one kernel (qkv_rope_kv; lora_qkv_triton.py).
FUSED_MLP = _switch("LORAMUX_FUSED_LORA_MLP")
FUSED_QKV = _switch("LORAMUX_FUSED_LORA_QKV")


@lru_cache(maxsize=None)
def _side_stream(device: torch.device):
    return torch.cuda.Stream(device=device)


def _gemm_and_shrink(x, weight, bias, a_stack, ranks, meta, overlap: bool):
    """Triton two-launch path, first half -> (y = x W^T (+ bias), fp32 split-K partials of the shrink).
    overlap: the shrink runs on a side stream concurrently with the GEMM (fork/join with stream waits, so it is
    also valid inside CUDA-graph capture, where it becomes a parallel branch). Same results either way."""
    tri = _tri()
    buf = tri.new_partials(x, a_stack, ranks)  # allocated (and later freed) on the current stream
    if not overlap:
        y = torch.nn.functional.linear(x, weight, bias)
        return y, tri.shrink_partials(x, a_stack, ranks, meta, buf)
    main, side = torch.cuda.current_stream(x.device), _side_stream(x.device)
    side.wait_stream(main)  # x (and meta) are ready
    with torch.cuda.stream(side):
        buf = tri.shrink_partials(x, a_stack, ranks, meta, buf)  # a view of buf: nothing allocated here
    y = torch.nn.functional.linear(x, weight, bias)
    main.wait_stream(side)
    return y, buf


def _two_launch(x, a_stack, ranks, meta, backend) -> bool:
    """Whether add_lora would take the Triton shrink + expand path for these inputs."""
    if resolve_backend(backend, x.device) != "triton":
        return False
    L, R = _check(x, a_stack, ranks, meta)
    return not _tri()._fused.use_fused(x.shape[0], x.shape[1], R)


def _up_to_expand(x, weight, bias, a_stack, b_stack, ranks, scales, offs, meta, overlap):
    """Triton two-launch path up to its expand -> (y, split-K partials, b_stack, ranks, scales) ready for it."""
    R = a_stack.shape[1] // ranks.shape[1]
    ranks, scales = _prep(ranks, scales)
    x, a_stack, b_stack = _tri_layout(x, None, a_stack, b_stack)
    overlap = (OVERLAP if overlap is None else overlap) and x.is_cuda
    y, buf = _gemm_and_shrink(x, weight, bias, a_stack, ranks, meta, overlap)
    _check_expand(y, b_stack, ranks, scales, offs, R)
    return y, buf, b_stack, ranks, scales


def lora_linear(x, weight, bias, a_stack, b_stack, ranks, scales, slice_offsets, meta, backend="auto",
                overlap: bool | None = None) -> torch.Tensor:
    """-> y = x W^T (+ bias), then add_lora(y, x, ...). overlap (None = OVERLAP): on CUDA with the Triton
    two-launch path, the shrink runs on a side stream beside the GEMM (_gemm_and_shrink)."""
    if not _two_launch(x, a_stack, ranks, meta, backend):
        y = torch.nn.functional.linear(x, weight, bias)
        add_lora(y, x, a_stack, b_stack, ranks, scales, slice_offsets, meta, backend)
        return y
    y, buf, b_stack, ranks, scales = _up_to_expand(x, weight, bias, a_stack, b_stack, ranks, scales,
                                                   tuple(slice_offsets), meta, overlap)
    _tri().expand(y, buf, b_stack, ranks, scales, tuple(slice_offsets), meta)
    return y


def gate_up_silu(x, weight, bias, a_stack, b_stack, ranks, scales, slice_offsets, meta, backend="auto",
                 silu_backend="auto", fused: bool | None = None, overlap: bool | None = None) -> torch.Tensor:
    """silu(gate) * up [T, I] of a packed gate|up linear (two slices of width I) with per-token LoRA.
    fused (None = FUSED_MLP) on the Triton two-launch path: GEMM, shrink, then ONE kernel adds both slices'
    deltas and applies SiLU*mul (lora_mlp_triton; the [T, 2I] output is not rewritten in place); equal bit for
    bit to lora_linear followed by the Triton silu_mul. Otherwise exactly that (silu_backend: fused_ops')."""
    fused = FUSED_MLP if fused is None else fused
    offs = tuple(slice_offsets)
    if not (fused and len(offs) == 3 and 2 * offs[1] == offs[2] and _two_launch(x, a_stack, ranks, meta, backend)):
        from .fused_ops import silu_mul

        y = lora_linear(x, weight, bias, a_stack, b_stack, ranks, scales, offs, meta, backend, overlap)
        return silu_mul(y, backend=silu_backend)
    y, buf, b_stack, ranks, scales = _up_to_expand(x, weight, bias, a_stack, b_stack, ranks, scales, offs, meta,
                                                   overlap)
    from . import lora_mlp_triton

    return lora_mlp_triton.expand_silu(y, buf, b_stack, ranks, scales, meta)


def qkv_rope_kv(x, weight, bias, a_stack, b_stack, ranks, scales, slice_offsets, meta, rope: tuple,
                backend="auto", rope_backend="auto", fused: bool | None = None,
                overlap: bool | None = None) -> torch.Tensor:
    """q [T, H, D] of a packed q|k|v linear with per-token LoRA, rotated, k/v written to the paged caches:
    rope = (positions, cos, sin, k_cache, v_cache, slot_mapping, H, Hkv, D) as rope_kv.rope_write_kv takes them.
    fused (None = FUSED_QKV) on the Triton two-launch path: GEMM, shrink, then ONE kernel adds the q/k/v deltas,
    rotates and writes (lora_qkv_triton; equal to the unfused chain, see there). Otherwise lora_linear, then
    rope_write_kv (rope_backend)."""
    fused = FUSED_QKV if fused is None else fused
    offs = tuple(slice_offsets)
    if not (fused and len(offs) == 4 and _two_launch(x, a_stack, ranks, meta, backend)):
        from .rope_kv import rope_write_kv

        y = lora_linear(x, weight, bias, a_stack, b_stack, ranks, scales, offs, meta, backend, overlap)
        return rope_write_kv(y, *rope, backend=rope_backend)
    y, buf, b_stack, ranks, scales = _up_to_expand(x, weight, bias, a_stack, b_stack, ranks, scales, offs, meta,
                                                   overlap)
    from . import lora_qkv_triton
    from .rope_kv import _check as check_rope

    check_rope(y, *rope)

    return lora_qkv_triton.expand_rope_kv(y, buf, b_stack, ranks, scales, meta, *rope)
