"""Packed step inputs (one host buffer, one copy) == the per-tensor construction they replaced, on CPU: eager steps
(prefill, decode, mixed; with and without adapters) and CUDA-graph decode steps padded to a bucket."""
from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from loramux.kernels.lora import build_lora_meta
from loramux.server.engine.request import Request, SamplingParams
from loramux.server.engine.scheduler import ScheduledBatch
from loramux.server.runner import cuda_graphs
from loramux.server.runner.model_runner import ModelRunner
from loramux.server.runner.step_inputs import HostStaging, Layout, pack, views

BS, NUM_SLOTS = 4, 3


class FakeSlots:
    """slot_of like LoRASlots; build_meta records its calls (the graph path must make none)."""

    num_slots = NUM_SLOTS

    def __init__(self):
        self.table = {"a0": 0, "a1": 1, "a2": 2, "cold": -1}  # "cold": registered but not in a GPU slot
        self.calls = []

    def slot_of(self, adapter_id):
        return self.table.get(adapter_id, -1)

    def build_meta(self, token_slots):
        self.calls.append(token_slots.clone())
        return build_lora_meta(token_slots, NUM_SLOTS)


def fake_runner(lora: bool, max_model_len: int = 64):
    return SimpleNamespace(block_size=BS, lora_slots=FakeSlots() if lora else None, device=torch.device("cpu"),
                           staging=HostStaging(torch.device("cpu")), kernel_backend="torch",
                           max_model_len=max_model_len, max_blocks_per_seq=-(-max_model_len // BS))


def random_batch(rng: random.Random, kind: str, adapters: bool, max_seqs: int = 9, max_len: int = 64):
    """kind: "prefill" (whole prompts or chunks), "decode" (one token each) or "mixed"."""
    reqs, news, free = [], [], rng.sample(range(200), 200)
    for i in range(rng.randint(1, max_seqs)):
        prompt = [rng.randrange(1, 500) for _ in range(rng.randint(1, max_len // 2))]
        r = Request(f"r{i}", prompt, SamplingParams(),
                    rng.choice(["a0", "a1", "a2", "cold", None]) if adapters else None)
        decode = kind == "decode" or (kind == "mixed" and rng.random() < 0.6)
        if decode:
            r.output_token_ids = [rng.randrange(1, 500) for _ in range(rng.randint(1, max_len // 2 - 1))]
            r.num_computed_tokens, n = r.num_tokens - 1, 1
        else:
            r.num_computed_tokens = rng.choice([0, rng.randrange(len(prompt))])  # a later chunk, sometimes
            n = rng.randint(1, len(prompt) - r.num_computed_tokens)
        need = -(-(r.num_computed_tokens + n) // BS)
        r.block_ids = [free.pop() for _ in range(min(need + rng.randint(0, 1), max_len // BS))]
        reqs.append(r)
        news.append(n)
    return ScheduledBatch(reqs, news)


def old_tensors(host):
    """The per-tensor construction prepare_host used before (CPU)."""
    ids, pos, slots, tables, seq_lens, _, logit_rows, token_lora = host
    return dict(ids=torch.tensor(ids, dtype=torch.int64), positions=torch.tensor(pos, dtype=torch.int64),
                slot_mapping=torch.tensor(slots, dtype=torch.int64),
                block_tables=torch.tensor(tables, dtype=torch.int32),
                seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
                logits_indices=torch.tensor(logit_rows, dtype=torch.int64),
                token_slots=None if token_lora is None else torch.tensor(token_lora, dtype=torch.int32))


def same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("kind", ["prefill", "decode", "mixed"])
@pytest.mark.parametrize("lora", [False, True])
def test_eager_inputs_equal_per_tensor_construction(kind, lora):
    rng = random.Random(hash((kind, lora)) % 1000)
    for _ in range(40):
        runner = fake_runner(lora)
        host, _ = ModelRunner._host_inputs(runner, random_batch(rng, kind, adapters=lora))
        ids, ctx, token_slots = ModelRunner.prepare_host(runner, host)
        old = old_tensors(host)
        assert same(ids, old["ids"]) and same(token_slots, old["token_slots"])
        for name in ("positions", "slot_mapping", "block_tables", "seq_lens", "logits_indices"):
            assert same(getattr(ctx, name), old[name]), name
        assert ctx.seq_lens_list == host[4] and ctx.query_lens == host[5]
        if old["token_slots"] is None:
            assert ctx.lora_meta is None and not (lora and runner.lora_slots.calls)
        else:  # the eager path builds the LoRA meta from the same slots as before
            assert same(runner.lora_slots.calls[-1], old["token_slots"])
            want = build_lora_meta(old["token_slots"], NUM_SLOTS)
            assert torch.equal(ctx.lora_meta.sorted_tokens, want.sorted_tokens)
            assert torch.equal(ctx.lora_meta.seg_start, want.seg_start)


def test_views_are_16_byte_aligned_and_disjoint():
    rng = random.Random(1)
    for _ in range(200):
        lay = Layout(*(rng.randint(0, 9) for _ in range(6)))
        buf = torch.empty(lay.words, dtype=torch.int64)
        t = views(buf, lay)
        spans = []
        for v in t:
            if v is not None and v.numel():
                assert v.data_ptr() % 16 == 0 and v.is_contiguous()
                spans.append((v.data_ptr(), v.data_ptr() + v.numel() * v.element_size()))
        spans.sort()
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
        assert not spans or spans[-1][1] <= buf.data_ptr() + lay.words * 8


def test_mixed_step_sections_pad_to_the_bucket():
    """Layout with E > 0 (mixed-step graphs): real rows as the eager packing, then padding; cu_q repeats its last
    value for padding sequences; the work table is prefill_work_table's for the real query lengths."""
    pytest.importorskip("triton")
    from loramux.kernels.attention import prefill_work_table

    rng = random.Random(3)
    for _ in range(50):
        lora = rng.random() < 0.5
        runner = fake_runner(lora)
        host, _ = ModelRunner._host_inputs(runner, random_batch(rng, "mixed", adapters=lora))
        ids, pos, slots, tables, seq_lens, qlens, rows, tok = host
        T, B, W, G, bm = len(ids) + rng.randint(0, 9), len(seq_lens) + rng.randint(0, 4), 16, 2, 16
        E = -(-T * G // bm) + B
        lay = Layout(T, B, B, T, W, E)
        buf = torch.full((lay.words,), -7, dtype=torch.int64)
        pack(buf.numpy(), lay, host, scratch_slot=99, attn_tiles=(G, bm))
        t = views(buf, lay)
        n, m = len(ids), len(seq_lens)
        assert t.ids[:n].tolist() == ids and not t.ids[n:].any()
        assert t.slot_mapping[:n].tolist() == slots and (t.slot_mapping[n:] == 99).all()
        assert t.logits_indices[:len(rows)].tolist() == rows and not t.logits_indices[len(rows):].any()
        assert t.seq_lens[:m].tolist() == seq_lens and (t.seq_lens[m:] == 1).all()
        want_slots = (tok if tok is not None else []) + [-1] * (T - (len(tok) if tok is not None else 0))
        assert t.token_slots.tolist() == want_slots
        cu = [0]
        for q in qlens:
            cu.append(cu[-1] + q)
        assert t.cu_q.tolist() == cu + [cu[-1]] * (B - m)
        assert torch.equal(t.work, prefill_work_table(qlens, G, bm, E).view(E, 2))
        assert (t.work[:, 0] < m).all() and ((t.work[:, 0] >= 0) | (t.work == -1).all(1)).all()


class OldStatic:
    """The static buffers and per-step writes of DecodeGraphs.run before packing (CPU)."""

    def __init__(self, bmax, max_blocks, scratch_slot):
        self.scratch_slot = scratch_slot
        self.ids, self.positions = torch.zeros(bmax, dtype=torch.int64), torch.zeros(bmax, dtype=torch.int64)
        self.slot_mapping = torch.full((bmax,), scratch_slot, dtype=torch.int64)
        self.block_tables = torch.zeros(bmax, max_blocks, dtype=torch.int32)
        self.seq_lens = torch.ones(bmax, dtype=torch.int32)
        self.token_slots = torch.full((bmax,), -1, dtype=torch.int32)

    def run(self, o, n, b, lora):
        self.ids[:n].copy_(o["ids"])
        self.positions[:n].copy_(o["positions"])
        self.slot_mapping[:n].copy_(o["slot_mapping"])
        self.slot_mapping[n:b].fill_(self.scratch_slot)
        width = o["block_tables"].shape[1]
        self.block_tables[:n, :width].copy_(o["block_tables"])
        self.block_tables[:n, width:].zero_()
        self.block_tables[n:b].zero_()
        self.seq_lens[:n].copy_(o["seq_lens"])
        self.seq_lens[n:b].fill_(1)
        if lora:
            self.token_slots[:n].copy_(o["token_slots"])
            self.token_slots[n:b].fill_(-1)


@pytest.mark.parametrize("full_tables", [True, False])
def test_graph_decode_inputs_equal_old_static_buffers(full_tables, monkeypatch):
    if not full_tables:  # long max_model_len: tables travel as [b, w] and are widened on the device
        monkeypatch.setattr(cuda_graphs, "FULL_TABLE_BYTES", 0)
    rng = random.Random(7)
    runner = fake_runner(True)
    graphs = cuda_graphs.DecodeGraphs(runner, cuda_graphs.default_buckets(12), scratch_block=200)
    assert graphs.full_tables == full_tables
    old = OldStatic(12, runner.max_blocks_per_seq, graphs.scratch_slot)
    for b in graphs.buckets:  # before any step: every row is padding
        ctx = graphs._ctx(b, False)
        assert same(ctx.slot_mapping, old.slot_mapping[:b]) and same(ctx.seq_lens, old.seq_lens[:b])
        assert same(ctx.block_tables, old.block_tables[:b]) and same(graphs.inputs[b].token_slots, old.token_slots[:b])
    for _ in range(60):
        host, _ = ModelRunner._host_inputs(runner, random_batch(rng, "decode", rng.random() < 0.7, max_seqs=12))
        n, lora = len(host[0]), host[7] is not None
        b, staged_lora = graphs.stage(host)
        assert b == graphs.bucket_for(n) and staged_lora == lora
        old.run(old_tensors(host), n, b, lora)
        ctx, t = graphs._ctx(b, False), graphs.inputs[b]
        assert same(t.ids[:n], old.ids[:n]) and same(ctx.positions[:n], old.positions[:n])  # padding: was stale
        assert same(ctx.slot_mapping, old.slot_mapping[:b]) and same(ctx.seq_lens, old.seq_lens[:b])
        assert same(ctx.block_tables, old.block_tables[:b]) and same(ctx.logits_indices, torch.arange(b))
        if lora:  # without adapters the graph does not read its token slots (now -1, before stale)
            assert same(t.token_slots, old.token_slots[:b])
        else:
            assert (t.token_slots == -1).all()
    assert not runner.lora_slots.calls  # no eager LoRA meta on the graph path
    assert graphs.stage((list(range(13)),) + ((),) * 7) is None  # past the largest bucket: eager
