"""Triton paged attention: KV-cache write, split-K GQA decode with a deterministic reduce, shared tile helpers
(the varlen causal prefill lives in attention_prefill_triton)."""
from __future__ import annotations

import functools
import itertools

import torch
import triton
import triton.language as tl

from .backend import cdiv, interpreter_on, next_pow2

# KV cache layout: [num_blocks, BS, Hkv, D] (last dim contiguous); a sequence's token p lives in block
# block_tables[b, p // BS] at row p % BS. Kernels gather BLOCK_N tokens at a time through the block table, so
# tiles may span several cache blocks and start anywhere (sliding windows). Scores are kept in the log2 domain
# (qk_scale = scale * log2(e), exp2). GQA: one program owns one KV head and all G query heads that share it, so
# every K/V tile is read once per (sequence, KV head) and multiplied against G (decode) or BLOCK_M (prefill) rows.
LOG2E = 1.4426950408889634
# The running max starts at a finite -1e30: fully masked tiles give exp2(-inf + 1e30) = 0, never NaN.
MAX_SPLITS = 64


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, s_kt, s_kh, s_vt, s_vh,
                     s_kcb, s_kct, s_kch, s_vcb, s_vct, s_vch,
                     BS: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, HD_POW2: tl.constexpr):
    # k, v [T, Hkv, D] -> caches [NB, BS, Hkv, D] at slot_mapping [T]; one program per token; slot < 0 skipped
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    blk = slot // BS
    row = slot % BS
    i = tl.arange(0, HD_POW2)  # flattened (head, dim)
    h = i // D
    d = i % D
    ok = i < HKV * D
    if HD_POW2 == HKV * D:  # no mask: keeps the accesses vectorised
        ok = None
    kx = tl.load(k_ptr + t.to(tl.int64) * s_kt + h * s_kh + d, mask=ok)
    vx = tl.load(v_ptr + t.to(tl.int64) * s_vt + h * s_vh + d, mask=ok)
    tl.store(kc_ptr + blk * s_kcb + row * s_kct + h * s_kch + d, kx, mask=ok)
    tl.store(vc_ptr + blk * s_vcb + row * s_vct + h * s_vch + d, vx, mask=ok)


@triton.jit
def _mask2(rows_ok, d, D: tl.constexpr, D_POW2: tl.constexpr):
    # [R] row mask -> mask of an [R, D_POW2] tile; for power-of-two D only the row mask (broadcast), so the
    # compiler still sees D contiguous, unmasked elements per row and vectorises the accesses
    if D == D_POW2:
        return rows_ok[:, None]
    else:
        return rows_ok[:, None] & (d[None, :] < D)


@triton.jit
def _attend(q, acc, m_i, l_i, k_base, v_base, bt_row, start, end, q_pos, window, qk_scale,
            s_kb, s_kt, s_vb, s_vt, d, D: tl.constexpr, D_POW2: tl.constexpr,
            BS: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
            DOT_F32: tl.constexpr):
    # q [M, Dp] (rows at positions q_pos [M]); keys [start, end) of one KV head; online softmax into
    # acc [M, Dp] fp32, m_i / l_i [M] fp32 (log2 domain). Returns the updated (acc, m_i, l_i).
    for n0 in range(start, end, BLOCK_N):
        kpos = n0 + tl.arange(0, BLOCK_N)  # [N] token positions
        k_ok = kpos < end
        blk = tl.load(bt_row + kpos // BS, mask=k_ok, other=0).to(tl.int64)  # [N] cache block per token
        kv_ok = _mask2(k_ok, d, D, D_POW2)
        k = tl.load(k_base + (blk * s_kb + (kpos % BS) * s_kt)[:, None] + d[None, :], mask=kv_ok, other=0.0)
        if DOT_F32:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))  # [M, N] fp32
        s = s * qk_scale
        valid = k_ok[None, :]
        if CAUSAL:
            valid = valid & (kpos[None, :] <= q_pos[:, None])
        if HAS_WINDOW:
            valid = valid & (kpos[None, :] > q_pos[:, None] - window)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])  # [M, N]
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + (blk * s_vb + (kpos % BS) * s_vt)[:, None] + d[None, :], mask=kv_ok, other=0.0)
        if DOT_F32:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, out_ptr, mid_o_ptr, mid_lse_ptr, bt_ptr, seq_lens_ptr, qk_scale, window,
                   num_splits, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_bt, s_ot, s_oh,
                   H: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_POW2: tl.constexpr,
                   BS: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, HAS_WINDOW: tl.constexpr,
                   DOT_F32: tl.constexpr):
    # q [B, H, D], one token per sequence at position seq_len - 1. grid (B, Hkv, num_splits): split sp takes an
    # equal, BLOCK_N-aligned share of the visible keys [lo, seq_len). not SPLIT: final out [B, H, D];
    # else partials mid_o [B, H, num_splits, D] fp32 (normalised) and mid_lse [B, H, num_splits] (log2 lse).
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    sp = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(seq_len - window, 0)
    chunk = tl.cdiv(tl.cdiv(seq_len - lo, num_splits), BLOCK_N) * BLOCK_N
    start = lo + sp * chunk
    end = tl.minimum(start + chunk, seq_len)
    g = tl.arange(0, G_PAD)  # [G_PAD] query heads of this KV head (rows >= G are padding for tl.dot)
    heads = kvh * G + g
    g_ok = g < G
    d = tl.arange(0, D_POW2)
    q = tl.load(q_ptr + b.to(tl.int64) * s_qt + heads[:, None] * s_qh + d[None, :],
                mask=_mask2(g_ok, d, D, D_POW2), other=0.0)  # [G_PAD, Dp]
    acc = tl.zeros((G_PAD, D_POW2), dtype=tl.float32)
    m_i = tl.full((G_PAD,), -1.0e30, dtype=tl.float32)
    l_i = tl.zeros((G_PAD,), dtype=tl.float32)
    q_pos = tl.zeros((G_PAD,), dtype=tl.int32) + seq_len - 1
    acc, m_i, l_i = _attend(q, acc, m_i, l_i, k_ptr + kvh * s_kh, v_ptr + kvh * s_vh, bt_ptr + b.to(tl.int64) * s_bt,
                            start, end, q_pos, window, qk_scale, s_kb, s_kt, s_vb, s_vt, d, D, D_POW2,
                            BS, BLOCK_N, False, False, DOT_F32)  # [start, end) is already causal and in-window
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if not SPLIT:
        tl.store(out_ptr + b.to(tl.int64) * s_ot + heads[:, None] * s_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=_mask2(g_ok, d, D, D_POW2))
    else:
        row = (b.to(tl.int64) * H + heads) * num_splits + sp  # [G_PAD]
        tl.store(mid_o_ptr + row[:, None] * D + d[None, :], o, mask=_mask2(g_ok, d, D, D_POW2))
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))  # empty split: -inf
        tl.store(mid_lse_ptr + row, lse, mask=g_ok)


@triton.jit
def _reduce_kernel(mid_o_ptr, mid_lse_ptr, out_ptr, num_splits, s_ot, s_oh, H: tl.constexpr, D: tl.constexpr,
                   D_POW2: tl.constexpr, S_POW2: tl.constexpr):
    # grid (B, H): out[b, h] = sum_s w_s * mid_o[b, h, s] / sum_s w_s, w_s = exp2(lse_s - max lse); fixed order
    b = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.arange(0, S_POW2)
    s_ok = sp < num_splits
    d = tl.arange(0, D_POW2)
    row = (b.to(tl.int64) * H + h) * num_splits
    lse = tl.load(mid_lse_ptr + row + sp, mask=s_ok, other=float("-inf"))  # [S]
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # no key at all (seq_len 0 padding rows): output 0
    w = tl.exp2(lse - m)
    o = tl.load(mid_o_ptr + (row + sp)[:, None] * D + d[None, :], mask=_mask2(s_ok, d, D, D_POW2), other=0.0)
    num = tl.sum(w[:, None] * o, 0)  # [Dp]
    den = tl.sum(w, 0)
    res = num / tl.where(den > 0, den, 1.0)
    tl.store(out_ptr + b.to(tl.int64) * s_ot + h * s_oh + d, res.to(out_ptr.dtype.element_ty), mask=d < D)


def _dot_f32(dtype: torch.dtype) -> bool:
    """fp32 uses exact (ieee) dots; the interpreter multiplies bf16 as raw integers, so widen there."""
    return dtype == torch.float32 or interpreter_on()


def _pow2(n: int, lo: int = 1) -> int:
    return max(lo, next_pow2(n))


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a few splits, so tests exercise the reduce


def write_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    """One launch for K and V; k/v may be strided views; tokens with slot_mapping < 0 are skipped (padding)."""
    T, hkv, D = k.shape
    if T == 0:
        return
    _write_kv_kernel[(T,)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                           *k_cache.stride()[:3], *v_cache.stride()[:3],
                           BS=k_cache.shape[1], HKV=hkv, D=D, HD_POW2=_pow2(hkv * D), num_warps=4)


def default_num_splits(batch: int, kv_heads: int, max_blocks: int, block_size: int, device: torch.device) -> int:
    """KV splits per (sequence, KV head) for decode: about 2 programs per SM, at least 256 tokens per split.
    Depends only on B, Hkv, block_tables.shape[1] (a fixed bound under CUDA graphs) and the device."""
    want = cdiv(2 * _num_sms(torch.device(device)), batch * kv_heads)
    return max(1, min(want, cdiv(max_blocks * block_size, 256), MAX_SPLITS))


def decode(q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window=None, num_splits=None,
           block_n=None, num_warps=4, num_stages=None) -> torch.Tensor:
    """q [B, H, D] (one token per sequence) -> out [B, H, D]. Launch shapes depend on B, shapes and num_splits
    only (no seq_lens values), so it can be captured in a CUDA graph with a fixed-width block table."""
    B, H, D = q.shape
    _, BS, hkv, _ = k_cache.shape
    G = H // hkv
    out = torch.empty(B, H, D, dtype=q.dtype, device=q.device)
    if B == 0:
        return out
    S = num_splits or default_num_splits(B, hkv, block_tables.shape[1], BS, q.device)
    bn = block_n or (16 if interpreter_on() else 64)
    mid_o = torch.empty(B, H, S, D, dtype=torch.float32, device=q.device) if S > 1 else out
    mid_lse = torch.empty(B, H, S, dtype=torch.float32, device=q.device) if S > 1 else out
    extra = {} if num_stages is None else {"num_stages": num_stages}
    _decode_kernel[(B, hkv, S)](
        q, k_cache, v_cache, out, mid_o, mid_lse, block_tables, seq_lens, scale * LOG2E, int(sliding_window or 0), S,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], block_tables.stride(0),
        out.stride(0), out.stride(1), H=H, G=G, G_PAD=_pow2(G, 16), D=D, D_POW2=_pow2(D, 16), BS=BS, BLOCK_N=bn,
        SPLIT=S > 1, HAS_WINDOW=bool(sliding_window), DOT_F32=_dot_f32(q.dtype), num_warps=num_warps, **extra)
    if S > 1:
        _reduce_kernel[(B, H)](mid_o, mid_lse, out, S, out.stride(0), out.stride(1), H=H, D=D, D_POW2=_pow2(D, 16),
                               S_POW2=_pow2(S, 2), num_warps=4)
    return out


def cu_seqlens(query_lens: list[int], device) -> torch.Tensor:
    """[B+1] int32 cumulative starts on device; the last result is cached (one H2D copy per step, not per layer)."""
    key = (str(device), tuple(query_lens))
    hit = _CU_CACHE.get("last")
    if hit is not None and hit[0] == key:
        return hit[1]
    cu = torch.tensor([0, *itertools.accumulate(query_lens)], dtype=torch.int32).to(device, non_blocking=True)
    _CU_CACHE["last"] = (key, cu)
    return cu


_CU_CACHE: dict = {}

