"""Paged attention over a block-structured KV cache: cache writes and attention (torch reference path)."""
from __future__ import annotations

import torch


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k, v [T, Hkv, D] -> caches [num_blocks, block_size, Hkv, D] at flat slots [T] (int64)."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)


def _gather(cache: torch.Tensor, block_tables: torch.Tensor, max_len: int) -> torch.Tensor:
    """cache [NB, BS, Hkv, D], block_tables [B, MB] -> [B, max_len, Hkv, D] (rows past a sequence are junk)."""
    bs = cache.shape[1]
    nblk = -(-max_len // bs)
    g = cache[block_tables[:, :nblk].long()]  # [B, nblk, BS, Hkv, D]
    return g.reshape(g.shape[0], nblk * bs, *cache.shape[2:])[:, :max_len]


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    seq_lens: torch.Tensor, seq_lens_list: list[int], query_lens: list[int], scale: float,
                    sliding_window: int | None = None) -> torch.Tensor:
    """Causal attention of new tokens to their sequence's cached K/V (the new K/V already written).

    q [T, H, D] packed by sequence (query_lens[i] tokens each, the last tokens of sequence i);
    block_tables [B, MB] int32; seq_lens [B] int (context length including the new tokens; also given as a
    host list so no device sync is needed) -> out [T, H, D].
    """
    max_seq_len = max(seq_lens_list)
    num_heads, head_dim = q.shape[1], q.shape[2]
    kv_heads = k_cache.shape[2]
    group = num_heads // kv_heads
    k_all = _gather(k_cache, block_tables, max_seq_len)  # [B, L, Hkv, D]
    v_all = _gather(v_cache, block_tables, max_seq_len)
    B, max_q = len(query_lens), max(query_lens)
    dev = q.device
    key_pos = torch.arange(max_seq_len, device=dev)
    seq_lens = seq_lens.to(dev).long()
    if max_q == 1:  # decode: every sequence has one new token, batch it as [B, Hkv, G, D]
        qb = q.view(B, kv_heads, group, head_dim).float()
        scores = torch.einsum("bhgd,blhd->bhgl", qb, k_all.float()) * scale
        q_pos = (seq_lens - 1).view(B, 1)
        valid = key_pos.view(1, -1) <= q_pos
        if sliding_window:
            valid &= key_pos.view(1, -1) > q_pos - sliding_window
        scores = scores.masked_fill(~valid.view(B, 1, 1, -1), float("-inf"))
        out = torch.einsum("bhgl,blhd->bhgd", scores.softmax(-1), v_all.float())
        return out.reshape(B, num_heads, head_dim).to(q.dtype)
    out = torch.empty_like(q)
    start = 0
    for i, n in enumerate(query_lens):  # prefill / mixed: one masked attention per sequence
        L = seq_lens_list[i]
        qi = q[start:start + n].float().view(n, kv_heads, group, head_dim)
        ki, vi = k_all[i, :L].float(), v_all[i, :L].float()
        scores = torch.einsum("nhgd,lhd->hgnl", qi, ki) * scale
        q_pos = torch.arange(L - n, L, device=dev).view(-1, 1)
        valid = key_pos[:L].view(1, -1) <= q_pos
        if sliding_window:
            valid &= key_pos[:L].view(1, -1) > q_pos - sliding_window
        scores = scores.masked_fill(~valid, float("-inf"))
        oi = torch.einsum("hgnl,lhd->nhgd", scores.softmax(-1), vi)
        out[start:start + n] = oi.reshape(n, num_heads, head_dim).to(q.dtype)
        start += n
    return out
