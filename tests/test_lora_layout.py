"""kernels/lora_layout.py: compact slot-slice B blocks (row stride = rank rounded up to 8) inside [S, N, R]."""
from __future__ import annotations

import pytest
import torch

from loramux.kernels.lora_layout import b_block, b_row_stride, pack_b


@pytest.mark.parametrize("R", [8, 16, 64, 12])
def test_blocks_are_compact_disjoint_and_round_trip(R):
    offs = (0, 40, 56, 72)
    g = torch.Generator().manual_seed(R)
    ranks = torch.randint(0, R + 1, (5, 3), generator=g, dtype=torch.int32)
    ranks[0] = R
    logical = torch.randn(5, offs[-1], R, generator=g)
    stack = pack_b(logical, ranks, offs, fill=float("nan"))
    used = torch.zeros(5, offs[-1] * R, dtype=torch.int32)
    for s in range(5):
        for i in range(3):
            r, lo, hi = int(ranks[s, i]), offs[i], offs[i + 1]
            blk = b_block(stack[s], lo, hi, r)
            assert torch.equal(blk, logical[s, lo:hi, :r])
            stride = b_row_stride(r, R)
            assert r <= stride <= R and (stride % 8 == 0 if R % 8 == 0 else stride == r)
            if r:  # rows start at the slice's region and advance by the stride: w * stride elements in all
                assert blk.storage_offset() - stack[s].storage_offset() == lo * R and blk.stride() == (stride, 1)
                used[s, lo * R:lo * R + (hi - lo) * stride] += 1
    assert used.max() <= 1  # blocks never overlap
    assert stack.isnan().sum() == stack.numel() - sum(
        (offs[i + 1] - offs[i]) * int(ranks[s, i]) for s in range(5) for i in range(3))


def test_full_rank_is_the_plain_layout():
    logical = torch.randn(3, 40, 16)
    ranks = torch.full((3, 2), 16, dtype=torch.int32)
    assert torch.equal(pack_b(logical, ranks, (0, 24, 40)), logical)


def test_block_copies_land_through_leading_dims():
    """LoRASlots writes one adapter's blocks for all layers through b[:, slot] ([layers, N, R] views)."""
    b = torch.zeros(4, 3, 40, 64)  # [layers, S, N, R]
    src = torch.randn(4, 24, 16)
    b_block(b[:, 1], 0, 24, 16).copy_(src)
    for layer in range(4):
        assert torch.equal(b_block(b[layer, 1], 0, 24, 16), src[layer])
    assert b[:, 1].reshape(4, -1)[:, :24 * 16].ne(0).all() and b[:, 1].reshape(4, -1)[:, 24 * 16:].eq(0).all()
