"""LORAMUX_LORA_TILE_TABLE (on by default): the per-step tile table (kernels/lora_meta.py) lists exactly the tiles
the kernels' in-kernel numbering finds, and the expand kernels reading it stay correct (Triton interpreter,
subprocess)."""
import os

import pytest
import torch

from loramux.kernels import lora_meta
from loramux.kernels.lora_meta import LoRAMeta, build_lora_meta, expand_block_m, tile_count

try:
    import triton  # noqa: F401
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def reference_tiles(meta: LoRAMeta, T: int, S: int) -> tuple[list[int], list[list[int]]]:
    """Group and token ids of every tile, numbered group by group (slots, then no adapter), padded to the bound."""
    bm, srt = expand_block_m(T), meta.sorted_tokens[:T].tolist()
    starts = meta.seg_start.tolist() + [T]
    slots, toks = [], []
    for g in range(S + 1):
        for r0 in range(starts[g], starts[g + 1], bm):
            slots.append(g)
            toks.append([srt[r] if r < starts[g + 1] else -1 for r in range(r0, r0 + bm)])
    assert len(slots) <= tile_count(T, S)
    pad = tile_count(T, S) - len(slots)
    return slots + [S + 1] * pad, toks + [[-1] * bm] * pad


@pytest.mark.parametrize("bm1, prefill_bm", [(False, 64), (True, 64), (True, 16)])
@pytest.mark.parametrize("T", [1, 2, 15, 16, 17, 64, 65, 200, 256, 300])
def test_table_matches_the_tile_numbering(T, bm1, prefill_bm, monkeypatch):
    monkeypatch.setattr(lora_meta, "TILE_TABLE", True)
    monkeypatch.setattr(lora_meta, "EXPAND_BM1", bm1)  # one-token tiles up to T = 64
    monkeypatch.setattr(lora_meta, "PREFILL_EXPAND_BM", prefill_bm)  # tile rows above T = 256
    g = torch.Generator().manual_seed(T)
    S = 6
    for slots in (torch.randint(-1, S, (T,), generator=g), torch.full((T,), 3), torch.full((T,), -1)):
        for out in (None, LoRAMeta.empty(512, S, "cpu")):  # sized for T, and preallocated for a larger T
            meta = build_lora_meta(slots, S, out=out)
            nt, bm = tile_count(T, S), expand_block_m(T)
            assert bm == (1 if bm1 and T <= 64 else 16 if T <= 64 else 32 if T <= 256 else prefill_bm)
            want_slots, want_toks = reference_tiles(meta, T, S)
            assert meta.tile_slot[:nt].tolist() == want_slots
            assert meta.tile_tok[:nt * bm].view(nt, bm).tolist() == want_toks


def test_no_table_when_switched_off(monkeypatch):
    monkeypatch.setattr(lora_meta, "TILE_TABLE", False)
    assert build_lora_meta(torch.tensor([0, -1, 1]), 2).tile_slot is None


@pytest.mark.skipif(not HAS_TRITON or INTERPRET, reason="needs triton; in-process when already interpreted")
def test_expand_kernels_with_the_segment_walk():
    """LORAMUX_LORA_TILE_TABLE=0 LORAMUX_LORA_EXPAND_BM1=0 (the table and one-token tiles are the defaults, so the
    other Triton cases run those): every expand kernel (plain, + SiLU*mul, + RoPE/KV) finding its tiles from the
    segment starts is correct vs the references, the fused ones bit-equal to the unfused chain."""
    from triton_interp import run_triton_cases

    tests = os.path.dirname(__file__)
    env = {"LORAMUX_KERNEL_BACKEND": "", "LORAMUX_FUSED_OPS_BACKEND": "", "LORAMUX_LORA_TILE_TABLE": "0",
           "LORAMUX_LORA_EXPAND_BM1": "0"}
    run_triton_cases(os.path.join(tests, "test_lora_kernels.py"), "triton and (shrink_then_expand or expand)", env)
    run_triton_cases(os.path.join(tests, "test_lora_mlp.py"), "triton and (split_k or mixed)", env)
    run_triton_cases(os.path.join(tests, "test_lora_qkv.py"), "triton", env)


@pytest.mark.skipif(not HAS_TRITON or INTERPRET, reason="needs triton; in-process when already interpreted")
def test_expand_kernels_each_switch_alone():
    """One-token tiles from the in-kernel numbering (no table), and the table with tiles of 16 rows: the fused
    expands stay correct and bit-equal to the unfused chain."""
    from triton_interp import run_triton_cases

    tests = os.path.dirname(__file__)
    env = {"LORAMUX_KERNEL_BACKEND": "", "LORAMUX_FUSED_OPS_BACKEND": "", "LORAMUX_LORA_TILE_TABLE": "0"}
    run_triton_cases(os.path.join(tests, "test_lora_kernels.py"), "triton and (shrink_then_expand or expand)", env)
    run_triton_cases(os.path.join(tests, "test_lora_mlp.py"), "triton and (split_k or mixed)", env)
    run_triton_cases(os.path.join(tests, "test_lora_qkv.py"), "triton", env)
    env.update(LORAMUX_LORA_TILE_TABLE="1", LORAMUX_LORA_EXPAND_BM1="0")
    run_triton_cases(os.path.join(tests, "test_lora_mlp.py"), "triton and mixed", env)
    run_triton_cases(os.path.join(tests, "test_lora_qkv.py"), "triton", env)


@pytest.mark.skipif(not HAS_TRITON or INTERPRET, reason="needs triton; in-process when already interpreted")
@pytest.mark.parametrize("bm, table", [("16", "1"), ("32", "0")])
def test_prefill_expand_tile_rows(bm, table):
    """LORAMUX_LORA_PREFILL_EXPAND_BM (experimental, default 64): prefill-sized steps (T = 300) with 16- or 32-row
    expand tiles, from the table and from the segment walk: every expand kernel stays correct."""
    from triton_interp import run_triton_cases

    tests = os.path.dirname(__file__)
    env = {"LORAMUX_KERNEL_BACKEND": "", "LORAMUX_FUSED_OPS_BACKEND": "", "LORAMUX_LORA_PREFILL_EXPAND_BM": bm,
           "LORAMUX_LORA_TILE_TABLE": table}
    run_triton_cases(os.path.join(tests, "test_lora_kernels.py"), "triton and long_segments", env)
    run_triton_cases(os.path.join(tests, "test_lora_mlp.py"), "triton and prefill", env)
    run_triton_cases(os.path.join(tests, "test_lora_qkv.py"), "triton and prefill", env)
