"""Top-p bound without a sort: for each row of x [B, V] (logits already divided by the temperature), the lowest
logit the nucleus keeps, found by a 16-way search over the ordered fp32 bit patterns, one pass over the row per
4 bits (at most 9 passes, each row's data re-read from L2) instead of a radix sort of the whole row and a scan.

The sampler's sort path keeps sorted position j when the probability mass before it is < top_p, so the kept set
is every token whose logit v has mass(x > v) < top_p (ties of the last kept value included). mass(x > t) only
changes at row values and falls as t rises, so the bound is the smallest row value t with mass(x > t) < p: the
search narrows an interval of keys (klo: mass >= p, khi: mass < p) until they are adjacent. Masses are summed in
fp32 in another order than the sort path's cumsum, so the two can differ where a row's mass meets top_p within
rounding. One program per row (a row fits L2: 513 KB at the Llama-3 vocabulary)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024
NC = 16  # candidate bounds per pass


@triton.jit
def _key(v):
    """fp32 -> int32 key in the same order as the floats (negatives: all bits but the sign flipped)."""
    b = v.to(tl.int32, bitcast=True)
    return tl.where(b >= 0, b, b ^ 0x7FFFFFFF)


@triton.jit
def _val(k):
    b = tl.where(k >= 0, k, k ^ 0x7FFFFFFF)
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _top_p_kernel(x_ptr, sx, p_ptr, thr_ptr, V, BLOCK: tl.constexpr, NC: tl.constexpr):
    row = tl.program_id(0)
    base = x_ptr + row.to(tl.int64) * sx
    p = tl.load(p_ptr + row)
    mv = tl.full((BLOCK,), float("-inf"), tl.float32)
    lv = tl.full((BLOCK,), float("inf"), tl.float32)
    for start in range(0, V, BLOCK):  # pass 1: the row's max and min
        n = start + tl.arange(0, BLOCK)
        v = tl.load(base + n, mask=n < V, other=float("-inf"))
        mv = tl.maximum(mv, v)
        lv = tl.minimum(lv, tl.where(n < V, v, float("inf")))
    m = tl.max(mv, 0)
    zv = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, V, BLOCK):  # pass 2: softmax denominator
        n = start + tl.arange(0, BLOCK)
        v = tl.load(base + n, mask=n < V, other=float("-inf"))
        zv += tl.exp(v - m)
    target = p * tl.sum(zv, 0)  # compare unnormalized masses with p * z
    klo = _key(tl.min(lv, 0)).to(tl.int64) - 1  # mass(x > t) = z >= p z below the row's min
    khi = _key(m).to(tl.int64)  # mass(x > max) = 0 < p z
    j = tl.arange(0, NC).to(tl.int64)
    while khi - klo > 1:
        cand = klo + ((khi - klo) * (j + 1) + NC - 1) // NC  # [NC] keys in (klo, khi], the last = khi
        t = _val(cand.to(tl.int32))
        s = tl.zeros((NC,), tl.float32)
        for start in range(0, V, BLOCK):
            n = start + tl.arange(0, BLOCK)
            v = tl.load(base + n, mask=n < V, other=float("-inf"))
            e = tl.exp(v - m)  # [BLOCK]; 0 for masked lanes and -inf logits
            s += tl.sum(tl.where(v[:, None] > t[None, :], e[:, None], 0.0), 0)
        below = s < target  # false ... true along the candidates
        khi = tl.min(tl.where(below, cand, khi), 0)
        klo = tl.max(tl.where(below, klo, cand), 0)
    tl.store(thr_ptr + row, _val(khi.to(tl.int32)))


def top_p_threshold(x: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """x fp32 [B, V] (unit stride in V), top_p [B] -> fp32 [B, 1]: the lowest logit each row's nucleus keeps
    (-inf where top_p >= 1: every token)."""
    B, V = x.shape
    assert x.dtype == torch.float32 and x.stride(1) == 1, (x.dtype, x.stride())
    p = top_p.float().contiguous()
    thr = torch.empty(B, dtype=torch.float32, device=x.device)
    if B:
        _top_p_kernel[(B,)](x, x.stride(0), p, thr, V, BLOCK=BLOCK, NC=NC, num_warps=8)  # [BLOCK, NC] per pass
    return torch.where(p >= 1.0, float("-inf"), thr).unsqueeze(1)
