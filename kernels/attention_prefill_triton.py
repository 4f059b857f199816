"""Triton varlen causal prefill over the paged KV cache: an eager launch sized by the step's longest query, and a
CUDA-graph-capturable launch driven by a device work table (grid and constexprs fixed by a capacity)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_triton import LOG2E, _attend, _dot_f32, _mask2, _pow2
from .backend import cdiv, interpreter_on


@triton.jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, out_ptr, bt_ptr, seq_lens_ptr, cu_q_ptr, work_ptr, qk_scale, window,
                    s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_bt, s_ot, s_oh,
                    G: tl.constexpr, D: tl.constexpr, D_POW2: tl.constexpr, BS: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_F32: tl.constexpr, TABLE: tl.constexpr):
    # q [T, H, D] packed by sequence (cu_q [B+1] starts). The n new tokens of sequence b x its G heads form n*G
    # rows r = t*G + g; a tile of BLOCK_M rows attends causally to the cached prefix and itself: keys
    # [window start of its first token, position of its last token].
    # not TABLE: grid (B, row tiles, Hkv). TABLE: grid (work entries, Hkv), entry w = work[w] = (b, tile) int32,
    # b < 0 is padding (the launch then depends on the table's capacity only, not on the query lengths).
    if TABLE:
        b = tl.load(work_ptr + 2 * tl.program_id(0))
        tile = tl.load(work_ptr + 2 * tl.program_id(0) + 1)
        kvh = tl.program_id(1)
        if b < 0:
            return
    else:
        b = tl.program_id(0)
        tile = tl.program_id(1)
        kvh = tl.program_id(2)
    q_lo = tl.load(cu_q_ptr + b)
    n = tl.load(cu_q_ptr + b + 1) - q_lo
    r0 = tile * BLOCK_M
    if r0 >= n * G:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    ctx = seq_len - n  # tokens cached before this step's chunk
    r = r0 + tl.arange(0, BLOCK_M)
    r_ok = r < n * G
    t = r // G
    heads = kvh * G + r % G
    q_pos = ctx + t  # [M]
    d = tl.arange(0, D_POW2)
    q_off = (q_lo + t).to(tl.int64)[:, None] * s_qt + heads[:, None] * s_qh + d[None, :]
    q = tl.load(q_ptr + q_off, mask=_mask2(r_ok, d, D, D_POW2), other=0.0)  # [M, Dp]
    end = ctx + tl.minimum((r0 + BLOCK_M - 1) // G, n - 1) + 1
    start = 0
    if HAS_WINDOW:
        start = tl.maximum(ctx + r0 // G - window + 1, 0)
    acc = tl.zeros((BLOCK_M, D_POW2), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc, m_i, l_i = _attend(q, acc, m_i, l_i, k_ptr + kvh * s_kh, v_ptr + kvh * s_vh, bt_ptr + b.to(tl.int64) * s_bt,
                            start, end, q_pos, window, qk_scale, s_kb, s_kt, s_vb, s_vt, d, D, D_POW2,
                            BS, BLOCK_N, True, HAS_WINDOW, DOT_F32)
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_off = (q_lo + t).to(tl.int64)[:, None] * s_ot + heads[:, None] * s_oh + d[None, :]
    tl.store(out_ptr + o_off, o.to(out_ptr.dtype.element_ty), mask=_mask2(r_ok, d, D, D_POW2))


def _launch(grid, q, k_cache, v_cache, out, block_tables, seq_lens, cu_q, work, scale, sliding_window, bm, bn, warps):
    G = q.shape[1] // k_cache.shape[2]
    D = q.shape[2]
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, block_tables, seq_lens, cu_q, cu_q if work is None else work, scale * LOG2E,
        int(sliding_window or 0), q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
        block_tables.stride(0), out.stride(0), out.stride(1), G=G, D=D, D_POW2=_pow2(D, 16), BS=k_cache.shape[1],
        BLOCK_M=bm, BLOCK_N=bn, HAS_WINDOW=bool(sliding_window), DOT_F32=_dot_f32(q.dtype), TABLE=work is not None,
        num_warps=warps, num_stages=1 if interpreter_on() else 2)


def prefill(q, k_cache, v_cache, block_tables, seq_lens, cu_q, max_query_len, scale, sliding_window=None,
            block_m=None, block_n=None) -> torch.Tensor:
    """q [T, H, D] packed by sequence, cu_q [B+1] int32 cumulative query starts (device) -> out [T, H, D].
    Eager only: the grid and BLOCK_M depend on max_query_len (host value of this step)."""
    T, H, D = q.shape
    G = H // k_cache.shape[2]
    out = torch.empty(T, H, D, dtype=q.dtype, device=q.device)
    B = cu_q.shape[0] - 1
    if T == 0 or B == 0:
        return out
    gpu = not interpreter_on()
    bm = block_m or (128 if gpu and max_query_len * G >= 128 else 64 if gpu else 16)
    bn = block_n or (64 if gpu else 16)
    warps = 8 if gpu and bm >= 128 and D >= 128 else 4
    grid = (B, cdiv(max_query_len * G, bm), k_cache.shape[2])
    _launch(grid, q, k_cache, v_cache, out, block_tables, seq_lens, cu_q, None, scale, sliding_window, bm, bn, warps)
    return out


def table_block_m(num_heads: int, num_kv_heads: int, head_dim: int) -> int:
    """Rows (token x query head) per work entry of the table launch: a function of the build (GPU or Triton
    interpreter) and head sizes only, never of a step's query lengths. Decode rows fill only G of these rows,
    so every shape takes 64 on GPU (the eager launch's tile for short queries), not the long prompts' 128."""
    return 16 if interpreter_on() else 64


def prefill_table_capacity(max_tokens: int, max_seqs: int, group: int, block_m: int) -> int:
    """Work entries that always suffice for any step of <= max_tokens new tokens over <= max_seqs sequences:
    a sequence of n tokens needs cdiv(n*G, block_m) tiles, and sum_b cdiv(x_b) <= cdiv(sum_b x_b) + B - 1
    (each sequence wastes less than one tile). Never below 1, so the launch grid is never empty."""
    seqs = min(max_seqs, max_tokens)  # every scheduled sequence has at least one new token
    return max(1, cdiv(max_tokens * group, block_m) + seqs - 1)


def prefill_work_table(query_lens: list[int], group: int, block_m: int, capacity: int,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """Host side of the table launch -> int32 CPU tensor [capacity, 2]: row w = (sequence index b, row-tile index)
    for each BLOCK_M-row tile of sequence b's query_lens[b] * G rows (sequences in order, tiles ascending;
    sequences with 0 new tokens get none), then padding rows (-1, -1). out: an int32 tensor of 2 * capacity
    elements to fill in place (e.g. a slice of a packed per-step input buffer), returned viewed as [capacity, 2].
    Raises ValueError if the step needs more than capacity rows."""
    if any(n < 0 for n in query_lens):
        raise ValueError(f"negative query length in {query_lens}")
    tiles = [cdiv(n * group, block_m) for n in query_lens]
    need = sum(tiles)
    if need > capacity:
        raise ValueError(f"prefill work table needs {need} entries ({len(query_lens)} sequences, {sum(query_lens)} "
                         f"tokens, G={group}, BLOCK_M={block_m}) but its capacity is {capacity}")
    if out is None:
        work = torch.empty(capacity, 2, dtype=torch.int32)
    elif out.dtype != torch.int32 or out.numel() != 2 * capacity:
        raise ValueError(f"out must be int32 with {2 * capacity} elements, got {out.dtype} {tuple(out.shape)}")
    else:
        work = out.view(capacity, 2)
    work[need:] = -1
    if need:
        work[:need] = torch.tensor([(b, i) for b, k in enumerate(tiles) for i in range(k)], dtype=torch.int32)
    return work


def prefill_graphed(q, k_cache, v_cache, block_tables, seq_lens, cu_q, work, scale, sliding_window=None,
                    out=None, block_m=None, block_n=None) -> torch.Tensor:
    """Capturable prefill: the same attention as prefill(), one program per (work entry, KV head).

    q [T, H, D] (rows past cu_q[B'] of the last real sequence are padding: never read as keys, their output rows
    never written); block_tables [B, MB] int32, seq_lens [B] int32, cu_q [B+1] int32 on device (rows past the real
    sequences may be padding: only rows named by the table are read); work [E, 2] int32 on device from
    prefill_work_table(query_lens, G, block_m, E) with block_m = table_block_m(H, Hkv, D) (or the block_m given
    here). out [T, H, D] optional (allocated if None). Grid (E, Hkv), BLOCK_M/BLOCK_N/warps depend only on
    shapes, dtype, sliding_window on/off and the device, so a graph captured once replays for any step that fits E.
    """
    T, H, D = q.shape
    hkv = k_cache.shape[2]
    if out is None:
        out = torch.empty(T, H, D, dtype=q.dtype, device=q.device)
    if work.dim() != 2 or work.shape[1] != 2 or work.dtype != torch.int32 or not work.is_contiguous():
        raise ValueError(f"work table must be contiguous int32 [E, 2], got {work.dtype} {tuple(work.shape)}")
    if {seq_lens.dtype, cu_q.dtype, block_tables.dtype} != {torch.int32}:  # read in place: no per-call casts
        raise ValueError("block_tables, seq_lens and cu_q must be int32")
    if T == 0 or work.shape[0] == 0:
        return out
    gpu = not interpreter_on()
    bm = block_m or table_block_m(H, hkv, D)
    bn = block_n or (64 if gpu else 16)
    warps = 8 if gpu and bm >= 128 and D >= 128 else 4
    _launch((work.shape[0], hkv), q, k_cache, v_cache, out, block_tables, seq_lens, cu_q, work, scale,
            sliding_window, bm, bn, warps)
    return out
