"""A step's integer inputs packed into one host buffer and moved to the device with one copy.

Layout of the int64 buffer (every section starts 16-byte aligned: Triton specializes kernels on pointer alignment,
so unaligned views would compile extra variants):
  int64: ids [T], positions [T], slot_mapping [T], logits_indices [L]
  int32: seq_lens [B], token_slots [TL] (TL = T when some token has an adapter, else 0), block_tables [B, W],
         and for mixed-step graphs (E > 0) cu_q [B+1] and the attention work table [E, 2] (kernels/attention.py
         paged_attention_table)
Rows past the host lists are padding (CUDA-graph buckets): id 0, position 0, KV slot `scratch_slot`, seq_len 1,
token slot -1 (no adapter), zero block-table entries (also the columns past a row's blocks), no query tokens
(cu_q repeats its last value), work entries (-1, -1).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch


def _up(x: int, a: int) -> int:
    return -(-x // a) * a


class Layout:
    """Offsets of one packed step: int64 sections in int64 words; int32 sections in int32 elements counted from
    word `i32`; `words` = buffer length."""

    __slots__ = ("T", "L", "B", "TL", "W", "E", "pos", "slots", "logits", "i32", "token_slots", "tables", "cu_q",
                 "work", "words")

    def __init__(self, T: int, L: int, B: int, TL: int, W: int, E: int = 0):
        self.T, self.L, self.B, self.TL, self.W, self.E = T, L, B, TL, W, E
        t = _up(T, 2)  # ids start at word 0
        self.pos, self.slots, self.logits = t, 2 * t, 3 * t
        self.i32 = self.logits + _up(L, 2)
        self.token_slots = _up(B, 4)  # seq_lens start at int32 0
        self.tables = self.token_slots + _up(TL, 4)
        self.cu_q = self.tables + _up(B * W, 4)
        self.work = self.cu_q + (_up(B + 1, 4) if E else 0)
        self.words = self.i32 + _up(self.work + 2 * E, 4) // 2


def host_layout(host) -> Layout:
    """Layout of an eager step's host lists (ModelRunner._host_inputs): no padding; tables are already one width."""
    ids, _, _, tables, seq_lens, _, logit_rows, token_lora = host
    return Layout(len(ids), len(logit_rows), len(seq_lens), len(ids) if token_lora is not None else 0,
                  len(tables[0]) if tables else 0)


def _put(a: np.ndarray, off: int, size: int, vals, pad: int) -> None:
    n = len(vals)
    a[off:off + n] = vals
    a[off + n:off + size] = pad


def pack(buf: np.ndarray, lay: Layout, host, scratch_slot: int = 0, attn_tiles: tuple[int, int] | None = None) -> None:
    """Write host lists (ids, positions, KV slots, block tables [B][w], seq lens, query lens, logit rows, token
    slots or None) into buf (int64 [lay.words]), padding every section to the layout's size. With lay.E > 0 also
    cu_q and the attention work table, for attn_tiles = (query heads per KV head, the table launch's BLOCK_M)."""
    ids, pos, slots, tables, seq_lens, query_lens, logit_rows, token_lora = host
    _put(buf, 0, lay.T, ids, 0)
    _put(buf, lay.pos, lay.T, pos, 0)
    _put(buf, lay.slots, lay.T, slots, scratch_slot)
    _put(buf, lay.logits, lay.L, logit_rows, 0)
    i32 = buf[lay.i32:lay.words].view(np.int32)
    _put(i32, 0, lay.B, seq_lens, 1)
    if lay.TL:
        _put(i32, lay.token_slots, lay.TL, token_lora if token_lora is not None else (), -1)
    tab = i32[lay.tables:lay.tables + lay.B * lay.W].reshape(lay.B, lay.W)
    m, w = len(tables), len(tables[0]) if tables else 0
    if w:
        tab[:m, :w] = tables
    tab[:m, w:] = 0
    tab[m:] = 0
    if lay.E:
        from loramux.kernels.attention import prefill_work_table

        cu = np.cumsum(query_lens) if len(query_lens) else np.zeros(0, dtype=np.int64)
        i32[lay.cu_q] = 0
        _put(i32, lay.cu_q + 1, lay.B, cu, cu[-1] if len(cu) else 0)
        prefill_work_table(query_lens, *attn_tiles, lay.E, out=torch.from_numpy(i32[lay.work:lay.work + 2 * lay.E]))


class StepTensors(NamedTuple):
    ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64
    logits_indices: torch.Tensor  # [L] int64
    seq_lens: torch.Tensor  # [B] int32
    token_slots: torch.Tensor | None  # [TL] int32, None when TL == 0
    block_tables: torch.Tensor  # [B, W] int32
    cu_q: torch.Tensor | None = None  # [B+1] int32 cumulative query starts (mixed-step graphs only)
    work: torch.Tensor | None = None  # [E, 2] int32 attention work table (mixed-step graphs only)


def views(buf: torch.Tensor, lay: Layout) -> StepTensors:
    """Views of a packed buffer (host or device, int64 [>= lay.words]); no copies."""
    T, i32 = lay.T, buf[lay.i32:lay.words].view(torch.int32)
    return StepTensors(buf[:T], buf[lay.pos:lay.pos + T], buf[lay.slots:lay.slots + T],
                       buf[lay.logits:lay.logits + lay.L], i32[:lay.B],
                       i32[lay.token_slots:lay.token_slots + lay.TL] if lay.TL else None,
                       i32[lay.tables:lay.tables + lay.B * lay.W].view(lay.B, lay.W),
                       i32[lay.cu_q:lay.cu_q + lay.B + 1] if lay.E else None,
                       i32[lay.work:lay.work + 2 * lay.E].view(lay.E, 2) if lay.E else None)


class HostStaging:
    """Host side of the one copy per step. On CUDA the host buffers are pinned, so the copy is asynchronous (the
    host does not wait for the queued GPU work, as torch.tensor(list, device=cuda) does), and they are reused
    round-robin. A non_blocking copy runs when the stream reaches it, possibly long after stage() returned, so a
    buffer is rewritten only after the event recorded behind its last copy has completed. Sampling steps sync in
    the sampler anyway, but steps that sample nothing (prefill chunks, tensor-parallel replicas) do not; the wait
    blocks only if the GPU is a whole ring of steps behind. On CPU each step packs into a fresh (unpinned) buffer,
    which is then the device buffer too."""

    def __init__(self, device: torch.device, ring: int = 2):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._bufs = [torch.empty(0, dtype=torch.int64) for _ in range(ring)]
        self._arrays = [b.numpy() for b in self._bufs]
        self._events = [torch.cuda.Event() for _ in range(ring)] if self.cuda else None
        self._i = 0

    def _acquire(self, words: int) -> tuple[torch.Tensor, np.ndarray]:
        if not self.cuda:
            buf = torch.empty(words, dtype=torch.int64)
            return buf, buf.numpy()
        self._i = i = (self._i + 1) % len(self._bufs)
        self._events[i].synchronize()  # the last copy out of this buffer has run (no-op if never recorded)
        if self._bufs[i].numel() < words:
            self._bufs[i] = torch.empty(max(1 << 12, 1 << (words - 1).bit_length()), dtype=torch.int64,
                                        pin_memory=True)
            self._arrays[i] = self._bufs[i].numpy()
        return self._bufs[i][:words], self._arrays[i][:words]

    def stage(self, lay: Layout, host, scratch_slot: int = 0, out: torch.Tensor | None = None,
              attn_tiles: tuple[int, int] | None = None) -> torch.Tensor:
        """Pack host lists by `lay` and copy them (one copy) into `out` (int64 [lay.words] on the device) or a new
        device buffer; -> the device buffer (on CPU without `out`: the packed host buffer itself)."""
        buf, arr = self._acquire(lay.words)
        pack(arr, lay, host, scratch_slot, attn_tiles)
        if out is None:
            if self.device.type == "cpu":
                return buf
            out = torch.empty(lay.words, dtype=torch.int64, device=self.device)
        out.copy_(buf, non_blocking=True)
        if self.cuda:
            self._events[self._i].record(torch.cuda.current_stream(self.device))  # the copy's stream, behind it
        return out
