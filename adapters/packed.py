"""Slot-ready packed form of an adapter: one flat host buffer (pinned on CUDA hosts) holding, per module, A and B
stacked over the layers, so copying an adapter into a GPU slot takes a few copies per module instead of one per
(layer, module) tensor (Llama-3-8B: 22 copies instead of ~700), and pinning is one allocation, not ~450.
Few calls matter off the engine thread too: each call that releases the GIL may wait for a busy engine thread
to hand it back (up to the interpreter's switch interval)."""
from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import torch

# Packed linear groups of the decoder, in slice order (server/models/llama.py LORA_TARGETS agrees; tested).
GROUPS = (("qkv_proj", ("q_proj", "k_proj", "v_proj")), ("o_proj", ("o_proj",)),
          ("gate_up_proj", ("gate_proj", "up_proj")), ("down_proj", ("down_proj",)))
_ALIGN = 64  # bytes; every view starts aligned (dtype views need it, and copies like it)

Weights = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class PackedAdapter:
    """Views into `buffer`. Module m: a[m] [num_layers, r_m, in], b[m] [num_layers, out, r_m] with r_m = its
    largest rank over the layers (rows/columns past a layer's own rank, and untargeted layers, are zero).
    Group g: ranks[g] int32 / scales[g] fp32 [num_layers, slices of g] (rank 0 = slice not targeted)."""

    num_layers: int
    buffer: torch.Tensor  # uint8 [bytes]
    layout: tuple  # ((kind, name, offset, dtype, shape), ...) to rebuild the views over another buffer
    a: dict[str, torch.Tensor]
    b: dict[str, torch.Tensor]
    ranks: dict[str, torch.Tensor]
    scales: dict[str, torch.Tensor]

    def view(self, layer: int, module: str, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [rank, in], B [out, rank]) of one layer's module, as views into the buffer."""
        return self.a[module][layer, :rank], self.b[module][layer, :, :rank]

    @property
    def is_pinned(self) -> bool:
        return self.buffer.is_pinned()

    def pinned(self) -> "PackedAdapter":
        """A copy in page-locked memory (one allocation + one memcpy); raises RuntimeError when exhausted."""
        buf = torch.empty(self.buffer.numel(), dtype=torch.uint8, pin_memory=True)
        return self.copied_to(buf)

    def copied_to(self, buffer: torch.Tensor) -> "PackedAdapter":
        """The same adapter over `buffer` (uint8, at least as large; its first bytes are overwritten)."""
        buf = buffer[:self.buffer.numel()]
        buf.copy_(self.buffer)
        return _views(self.num_layers, buf, self.layout)


class PackedViews(Mapping):
    """(layer, module) -> (A [r, in], B [out, r]) views into a PackedAdapter, each made on first access: making
    all ~450 pairs up front is ~1,000 tensor calls, each a chance to wait for a busy engine thread's GIL."""

    def __init__(self, packed: PackedAdapter, ranks: dict[tuple[int, str], int]):
        self.packed, self.ranks = packed, ranks
        self._made: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def __getitem__(self, key):
        hit = self._made.get(key)
        if hit is None:
            hit = self._made[key] = self.packed.view(*key, self.ranks[key])
        return hit

    def __iter__(self):
        return iter(self.ranks)

    def __len__(self) -> int:
        return len(self.ranks)

    def over(self, packed: PackedAdapter) -> "PackedViews":
        """The same views over another copy of the packed adapter."""
        return PackedViews(packed, self.ranks)

    @property
    def nbytes(self) -> int:
        esz = next(iter(self.packed.a.values())).element_size() if self.packed.a else 0
        return sum(r * (self.packed.a[m].shape[2] + self.packed.b[m].shape[1]) * esz
                   for (_, m), r in self.ranks.items())


def from_buffer(num_layers: int, buffer: torch.Tensor, layout: tuple) -> PackedAdapter:
    """A packed adapter over a buffer that holds one (e.g. read back from a file a worker process wrote)."""
    return _views(num_layers, buffer, layout)


def _views(num_layers: int, buffer: torch.Tensor, layout: tuple) -> PackedAdapter:
    parts: dict[str, dict[str, torch.Tensor]] = {"a": {}, "b": {}, "ranks": {}, "scales": {}}
    for kind, name, off, dtype, shape in layout:
        n = torch.Size(shape).numel() * dtype.itemsize
        parts[kind][name] = buffer[off:off + n].view(dtype).view(shape)
    return PackedAdapter(num_layers, buffer, layout, **parts)


def _plan(weights: Weights, num_layers: int, dtype: torch.dtype) -> tuple[tuple, int]:
    layout, off = [], 0

    def add(kind, name, dt, shape):
        nonlocal off
        layout.append((kind, name, off, dt, tuple(shape)))
        off += -(-torch.Size(shape).numel() * dt.itemsize // _ALIGN) * _ALIGN

    for group, modules in GROUPS:
        for m in modules:
            pairs = [ab for (layer, mod), ab in weights.items() if mod == m]
            if pairs:
                r = max(a.shape[0] for a, _ in pairs)
                add("a", m, dtype, (num_layers, r, pairs[0][0].shape[1]))
                add("b", m, dtype, (num_layers, pairs[0][1].shape[0], r))
        if any(mod in modules for _, mod in weights):
            add("ranks", group, torch.int32, (num_layers, len(modules)))
            add("scales", group, torch.float32, (num_layers, len(modules)))
    return tuple(layout), off


def pack(weights: Weights, scales: dict[tuple[int, str], float], num_layers: int, dtype: torch.dtype,
         pin: bool = False, phases: Counter | None = None) -> tuple[PackedAdapter, "PackedViews"]:
    """-> (packed adapter, the same weights as views into it, cast to dtype). Layers >= num_layers are refused.
    phases: seconds spent allocating ("alloc", page-locking when pin) and filling ("pack") are added to it."""
    if any(layer >= num_layers or layer < 0 for layer, _ in weights):
        raise ValueError(f"weights name a layer outside 0..{num_layers - 1}")
    layout, size = _plan(weights, num_layers, dtype)
    t0 = time.perf_counter()
    buf = torch.empty(size, dtype=torch.uint8, pin_memory=pin)
    t1 = time.perf_counter()
    p = _views(num_layers, buf, layout)
    slice_of = {m: (g, i) for g, mods in GROUPS for i, m in enumerate(mods)}
    for m, a_m in p.a.items():  # zero only what no weight will cover (untargeted layers, rank padding)
        b_m, r_m = p.b[m], a_m.shape[1]
        for layer in range(num_layers):
            ab = weights.get((layer, m))
            r = 0 if ab is None else ab[0].shape[0]
            if r < r_m:
                a_m[layer, r:].zero_()
                b_m[layer, :, r:].zero_()
    rank_of: dict[tuple[int, str], int] = {}
    for m, a_m in p.a.items():
        rows = [weights.get((layer, m)) for layer in range(num_layers)]
        if all(ab is not None and ab[0].shape[0] == a_m.shape[1] for ab in rows):  # usual case: one call each
            # cat of flat views, casting into out: 10-40x faster on CPU than stack(out=) with a cast (measured)
            torch.cat([a.reshape(-1) for a, _ in rows], out=a_m.view(-1))
            torch.cat([b.reshape(-1) for _, b in rows], out=p.b[m].view(-1))
        else:
            for layer, ab in enumerate(rows):
                if ab is not None:
                    r = ab[0].shape[0]
                    p.a[m][layer, :r].copy_(ab[0])
                    p.b[m][layer, :, :r].copy_(ab[1])
    ranks = {g: [[0] * len(mods) for _ in range(num_layers)] for g, mods in GROUPS}
    scale_rows = {g: [[0.0] * len(mods) for _ in range(num_layers)] for g, mods in GROUPS}
    for (layer, m), (a, b) in weights.items():
        r = a.shape[0]
        rank_of[(layer, m)] = r
        g, i = slice_of[m]
        ranks[g][layer][i] = r
        scale_rows[g][layer][i] = float(scales[(layer, m)])
    for g in p.ranks:  # one copy per group, not one tensor op per (layer, module)
        p.ranks[g].copy_(torch.tensor(ranks[g], dtype=torch.int32))
        p.scales[g].copy_(torch.tensor(scale_rows[g], dtype=torch.float32))
    if phases is not None:
        phases["alloc"] += t1 - t0
        phases["pack"] += time.perf_counter() - t1
    return p, PackedViews(p, rank_of)
