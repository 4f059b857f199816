"""Per-step LoRA metadata: tokens grouped by adapter slot (counting sort on the device, CUDA-graph capturable)
and (LORAMUX_LORA_TILE_TABLE, on by default) the token tiles the expand kernels walk, precomputed."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

# On by default since session 11 (H100 decode, with EXPAND_BM1 and lora_triton.REDUCE_PARTIALS: docs/performance.md;
# `0` restores the in-kernel segment walk). The expand kernels (lora_triton, lora_mlp_triton, lora_qkv_triton) read
# each program's slot and token ids from a table built here, and pick the slot's rank and scale out of vectors
# loaded beside it: one dependent memory round trip before the tile's data instead of three (segment starts -> rank
# -> token ids).
TILE_TABLE = os.environ.get("LORAMUX_LORA_TILE_TABLE", "1") != "0"
# On by default since session 11 (as TILE_TABLE): decode expands (T <= BM1_MAX_T) take one token per program (as
# Punica's BGMV), not a 16-row tile of one slot's tokens: the grid is exactly T token programs (a tile grid must
# also cover one partial tile per slot, so with few adapters most of its programs have no work), and at one token
# per slot no tile rows go unused.
EXPAND_BM1 = os.environ.get("LORAMUX_LORA_EXPAND_BM1", "1") != "0"
BM1_MAX_T = 64
# Experimental (default 64 = as measured): token rows per expand tile above 256 tokens. At 64 rows the prefill
# expands compile to 182-238 registers per thread on sm_90 (tests/sm90_compile.py), so an SM holds only 8 warps of
# a memory-bound kernel: the 2048-token profile has the fused gate|up expand at 3x the SiLU*mul it replaces.
_bm = os.environ.get("LORAMUX_LORA_PREFILL_EXPAND_BM", "64")
if _bm not in ("16", "32", "64"):  # `loramux serve` turns this into a one-line start-up error (cli._check_switches)
    raise ValueError(f"LORAMUX_LORA_PREFILL_EXPAND_BM={_bm!r}; expected 16, 32 or 64")
PREFILL_EXPAND_BM = int(_bm)


def block_m(T: int) -> int:
    """Token rows per tile of the LoRA kernels for a step of T tokens."""
    return 16 if T <= 64 else (32 if T <= 256 else 64)


def expand_block_m(T: int) -> int:
    """Token rows per tile of the expand kernels (EXPAND_BM1: one at decode sizes)."""
    if EXPAND_BM1 and T <= BM1_MAX_T:
        return 1
    return PREFILL_EXPAND_BM if T > 256 else block_m(T)


def expand_tiles(T: int, groups: int) -> int:
    """Bound on the expand tiles of T tokens in `groups` groups: each group adds at most one partial tile (none
    with one-row tiles). The expand kernels' grid size along tiles (a function of T and S only: graph-safe)."""
    bm = expand_block_m(T)
    return T if bm == 1 else -(-T // bm) + min(groups, T)


def tile_count(T: int, S: int) -> int:
    """Tiles of the table: over S slots + the no-adapter group."""
    return expand_tiles(T, S + 1)


@dataclass
class LoRAMeta:
    """Per-step token grouping shared by every LoRA layer. Buffers are sized for max_tokens; entries past
    num_tokens are stale. Segment of slot s = sorted_tokens[seg_start[s]:seg_start[s+1]]."""

    token_slots: torch.Tensor  # int32 [T_max]: slot per token, -1 = no adapter
    sorted_tokens: torch.Tensor  # int32 [T_max]: token ids grouped by slot (stable), no-adapter tokens last
    seg_start: torch.Tensor  # int32 [S+1]: segment starts; seg_start[S] = number of tokens with an adapter
    num_slots: int  # S
    num_tokens: int  # T of the step (host int: a captured graph is specific to T anyway)
    _arange: torch.Tensor  # int32 [T_max] = arange(T_max)
    _slot_ids: torch.Tensor  # int64 [S+1] = arange(S+1)
    # TILE_TABLE: tile i (numbered as lora_tiles_triton._pick_tile over S + 1 groups) belongs to group
    # tile_slot[i] (S = tokens without adapter, S + 1 = past the last tile) and holds the token ids
    # tile_tok[i * BM : (i + 1) * BM] (-1 = empty row), BM = expand_block_m(T)
    tile_slot: torch.Tensor | None = None  # int32 [tiles bound]
    tile_tok: torch.Tensor | None = None  # int32 [tiles bound * BM]
    _tile_ids: torch.Tensor | None = None  # int64 arange(max(tiles bound, 64))

    @classmethod
    def empty(cls, max_tokens: int, num_slots: int, device) -> "LoRAMeta":
        i32 = dict(dtype=torch.int32, device=device)
        i64 = dict(dtype=torch.int64, device=device)
        meta = cls(torch.full((max_tokens,), -1, **i32), torch.zeros(max_tokens, **i32),
                   torch.zeros(num_slots + 1, **i32), num_slots, 0, torch.arange(max_tokens, **i32),
                   torch.arange(num_slots + 1, **i64))
        if TILE_TABLE:  # sized for every T <= max_tokens: tiles <= T + S + 1, tiles * BM <= T + (S + 2) * 64
            meta.tile_slot = torch.zeros(max_tokens + num_slots + 2, **i32)
            meta._tile_ids = torch.arange(max(64, meta.tile_slot.numel()), **i64)
            meta.tile_tok = torch.zeros(max_tokens + (num_slots + 2) * 64, **i32)
        return meta

    @property
    def max_tokens(self) -> int:
        return self.token_slots.shape[0]

    @property
    def device(self) -> torch.device:
        return self.token_slots.device


def build_lora_meta(token_slots: torch.Tensor, num_slots: int, out: LoRAMeta | None = None) -> LoRAMeta:
    """token_slots: int32/int64 [T] in [-1, num_slots); -1 = no adapter. Counting sort with elementwise ops,
    cumsum and scatter only: no host sync and no library sort (CUB sorts are not always capturable), so it can
    run inside a CUDA graph; deterministic. With `out`, results go into its buffers (temporaries: O(T*S) ints).
    Values outside [-1, num_slots) are not checked (that would sync)."""
    if token_slots.dim() != 1:
        raise ValueError("token_slots must be 1-D [T]")
    T, S = token_slots.shape[0], num_slots
    if out is None:
        out = LoRAMeta.empty(T, S, token_slots.device)
    elif out.num_slots != S or T > out.max_tokens or out.device != token_slots.device:
        raise ValueError(f"meta buffers hold {out.max_tokens} tokens x {out.num_slots} slots on {out.device}; "
                         f"got T={T}, num_slots={S} on {token_slots.device}")
    out.num_tokens = T
    if T == 0:
        out.seg_start.zero_()
        return out
    ts = out.token_slots[:T]
    ts.copy_(token_slots)
    key = ts.long().masked_fill_(ts < 0, S)  # [T] in [0, S]; no-adapter tokens form the last group
    hits = out._slot_ids[:, None] == key[None, :]  # [S+1, T] one-hot (bool)
    seen = hits.cumsum(1, dtype=torch.int32)  # [S+1, T]: group's tokens so far (scan along contiguous T)
    counts = seen[:, -1]  # [S+1]
    torch.cumsum(counts, 0, dtype=torch.int32, out=out.seg_start)
    out.seg_start.sub_(counts)  # exclusive: seg_start[s] = first sorted position of group s
    pos = seen.gather(0, key[None, :])[0].add_(out.seg_start[key]).sub_(1)  # [T] stable sorted position
    out.sorted_tokens.scatter_(0, pos.long(), out._arange[:T])
    if out.tile_slot is not None:
        _fill_tiles(out, counts, T, S)
    return out


def _fill_tiles(out: LoRAMeta, counts: torch.Tensor, T: int, S: int) -> None:
    """tile_slot / tile_tok for this step (torch ops on the device, no sync): the same tiles, in the same order,
    as the kernels' in-kernel numbering (lora_tiles_triton._pick_tile) finds from seg_start."""
    bm, nt = expand_block_m(T), tile_count(T, S)
    ntile = (counts.long() + bm - 1) // bm  # [S+1] tiles per group
    tend = ntile.cumsum(0)  # [S+1] inclusive
    i = out._tile_ids[:nt]
    g = (tend[None, :] <= i[:, None]).sum(1)  # [nt] group of tile i; S + 1 past the last tile
    gc = g.clamp(max=S)
    lo = out.seg_start[gc].long()
    row0 = lo + (i - (tend[gc] - ntile[gc])) * bm  # [nt] first sorted row of the tile
    rows = row0[:, None] + out._tile_ids[None, :bm]  # [nt, bm]
    ok = (rows < (lo + counts[gc].long())[:, None]) & (g <= S)[:, None]
    tok = torch.where(ok, out.sorted_tokens[rows.clamp(0, T - 1)], -1)
    out.tile_slot[:nt].copy_(g)
    out.tile_tok[:nt * bm].copy_(tok.flatten())
