"""Paged attention over a block-structured KV cache: cache writes and attention, Triton/torch dispatch."""
from __future__ import annotations

import torch

from .backend import resolve


def write_kv_reference(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
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


def paged_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              block_tables: torch.Tensor, seq_lens: torch.Tensor, seq_lens_list: list[int],
                              query_lens: list[int], scale: float, sliding_window: int | None = None) -> torch.Tensor:
    """Causal attention of new tokens to their sequence's cached K/V (the new K/V already written).

    q [T, H, D] packed by sequence (query_lens[i] tokens each, the last tokens of sequence i);
    block_tables [B, MB] int32; seq_lens [B] int (context length including the new tokens; also given as a
    host list so no device sync is needed) -> out [T, H, D]. seq_lens_list / query_lens None: a decode step
    without host metadata (CUDA-graph style); keys are bounded by the block-table width.
    """
    max_seq_len = max(seq_lens_list) if seq_lens_list is not None else block_tables.shape[1] * k_cache.shape[1]
    num_heads, head_dim = q.shape[1], q.shape[2]
    kv_heads = k_cache.shape[2]
    group = num_heads // kv_heads
    k_all = _gather(k_cache, block_tables, max_seq_len)  # [B, L, Hkv, D]
    v_all = _gather(v_cache, block_tables, max_seq_len)
    B = block_tables.shape[0]
    max_q = max(query_lens) if query_lens is not None else 1
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


def resolve_backend(name: str, device: torch.device | str) -> str:
    """"auto" | "triton" | "torch" -> "triton" | "torch"; env LORAMUX_ATTENTION_BACKEND overrides "auto"."""
    return resolve(name, device, "LORAMUX_ATTENTION_BACKEND", "attention")


def _tri():
    from . import attention_triton  # lazily: CPU installs without triton never import it

    return attention_triton


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, backend: str = "auto") -> None:
    """k, v [T, Hkv, D] -> caches [num_blocks, block_size, Hkv, D] at flat slots [T] (int64).
    Triton: one launch for K and V, strided k/v accepted, slots < 0 skipped (padding rows of a CUDA graph)."""
    if resolve_backend(backend, k.device) == "torch":
        write_kv_reference(k, v, k_cache, v_cache, slot_mapping)
    else:
        _tri().write_kv(k, v, k_cache, v_cache, slot_mapping)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    seq_lens: torch.Tensor, seq_lens_list: list[int] | None, query_lens: list[int] | None,
                    scale: float, sliding_window: int | None = None, backend: str = "auto",
                    num_kv_splits: int | None = None) -> torch.Tensor:
    """Causal attention of new tokens to their sequence's cached K/V (the new K/V already written).

    q [T, H, D] packed by sequence (query_lens[i] tokens each, the last tokens of sequence i);
    block_tables [B, MB] int32; seq_lens [B] int32 (context incl. the new tokens; also as a host list) ->
    out [T, H, D]. sliding_window w: a query at position p sees keys at positions > p - w. GQA: H % Hkv == 0.

    Triton decode (all query_lens == 1) never reads seq_lens_list: its launch depends only on B, the shapes and
    the number of KV splits, which defaults to a function of (B, Hkv, MB = block_tables.shape[1], SM count).
    To capture it in a CUDA graph, pass block tables of a fixed width (max blocks per sequence) or pin
    num_kv_splits; rows with seq_len 0 produce zeros. Prefill/mixed batches use the host lists (not captured;
    paged_attention_table is the capturable form).
    """
    decode = query_lens is None or max(query_lens) == 1  # None: graph-captured decode, no host metadata
    n_seqs = q.shape[0] if query_lens is None else len(query_lens)
    if q.shape[1] % k_cache.shape[2] or q.shape[2] != k_cache.shape[3] or n_seqs != block_tables.shape[0]:
        raise ValueError(f"q {tuple(q.shape)}, cache {tuple(k_cache.shape)}, {len(query_lens)} query lens and "
                         f"block tables {tuple(block_tables.shape)} do not fit")
    if resolve_backend(backend, q.device) == "torch":
        return paged_attention_reference(q, k_cache, v_cache, block_tables, seq_lens, seq_lens_list, query_lens,
                                         scale, sliding_window)
    tri = _tri()
    if q.stride(-1) != 1:
        q = q.contiguous()
    seq_lens = seq_lens.to(torch.int32)
    if decode:  # every sequence has exactly one new token
        return tri.decode(q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window, num_kv_splits)
    cu_q = tri.cu_seqlens(query_lens, q.device)
    return _tri_prefill().prefill(q, k_cache, v_cache, block_tables, seq_lens, cu_q, max(query_lens), scale,
                                  sliding_window)


def _tri_prefill():
    from . import attention_prefill_triton  # lazily, as _tri()

    return attention_prefill_triton


def prefill_table_block_m(num_heads: int, num_kv_heads: int, head_dim: int) -> int:
    """BLOCK_M (rows = token x query head) of one work entry of paged_attention_table (needs triton)."""
    return _tri_prefill().table_block_m(num_heads, num_kv_heads, head_dim)


def prefill_table_capacity(max_tokens: int, max_seqs: int, group: int, block_m: int) -> int:
    """Work entries enough for any step of <= max_tokens new tokens over <= max_seqs sequences:
    cdiv(max_tokens * G, block_m) + min(max_seqs, max_tokens) - 1 (needs triton)."""
    return _tri_prefill().prefill_table_capacity(max_tokens, max_seqs, group, block_m)


def prefill_work_table(query_lens: list[int], group: int, block_m: int, capacity: int,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """-> int32 CPU [capacity, 2] rows (sequence, row tile), padding (-1, -1), written into out (2 * capacity
    int32 elements) when given; ValueError past capacity (needs triton)."""
    return _tri_prefill().prefill_work_table(query_lens, group, block_m, capacity, out)


def paged_attention_table(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                          seq_lens: torch.Tensor, cu_q: torch.Tensor, work: torch.Tensor, scale: float,
                          sliding_window: int | None = None, backend: str = "auto", out: torch.Tensor | None = None,
                          query_lens: list[int] | None = None) -> torch.Tensor:
    """paged_attention for any mix of prefill chunks and decode rows, with a CUDA-graph-capturable launch.

    q [T, H, D] packed by sequence; rows from cu_q[B'] on (B' real sequences) are padding. block_tables [B, MB]
    int32, seq_lens [B] int32 (context incl. the new tokens), cu_q [B+1] int32 cumulative query starts, all on
    q's device; rows past the B' real sequences may be padding (never read). work [E, 2] int32 on device, the
    rows of prefill_work_table(query_lens, H // Hkv, prefill_table_block_m(H, Hkv, D), E), E >= the step's need
    (prefill_table_capacity bounds it). -> out [T, H, D] (given or allocated); padding rows are not written.

    Capture contract (Triton): the launch reads no host value of the step: grid (E, Hkv) and constexprs depend
    on shapes, dtypes, sliding_window on/off and the device. Capture once with static q / out / block_tables /
    seq_lens / cu_q / work buffers of a bucket's capacity, then per step copy the new values into them and replay.
    Backend "torch" (reference, not capturable) needs the host query_lens of the B' real sequences instead of
    the table, and syncs to read seq_lens.
    """
    if q.shape[1] % k_cache.shape[2] or q.shape[2] != k_cache.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and cache {tuple(k_cache.shape)} do not fit")
    if resolve_backend(backend, q.device) == "torch":
        if query_lens is None:
            raise ValueError("backend 'torch' needs the host query_lens")
        B, T = len(query_lens), sum(query_lens)
        out = torch.empty_like(q) if out is None else out
        if T == 0:
            return out
        out[:T] = paged_attention_reference(q[:T], k_cache, v_cache, block_tables[:B], seq_lens[:B],
                                           seq_lens[:B].tolist(), query_lens, scale, sliding_window)
        return out
    if q.stride(-1) != 1:
        q = q.contiguous()
    return _tri_prefill().prefill_graphed(q, k_cache, v_cache, block_tables, seq_lens, cu_q, work, scale,
                                          sliding_window, out=out)
