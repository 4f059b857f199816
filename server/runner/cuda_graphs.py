"""CUDA graphs for decode steps: captured once per bucketed batch size (with and without LoRA), replayed per step."""
from __future__ import annotations

import gc
import logging
import time

import torch

from loramux.server.models.forward_context import ForwardContext

from .step_inputs import Layout, views

log = logging.getLogger("loramux.graphs")
FULL_TABLE_BYTES = 1 << 19  # block tables [bmax, max_blocks] int32 up to this size travel in the step's one copy


def capture_graph(fn, pool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Run fn twice on a side stream (Triton compiles and lazy initialisation stay out of the capture), then
    capture it -> (graph, its output tensor, rewritten by each replay)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    # The cyclic collector must not run inside the capture: freeing a dead engine's graphs there invalidates it
    # (torch's graph context no longer collects first unless force_cudagraph_gc is set); it runs after instead.
    gc.disable()
    try:
        with torch.cuda.graph(graph, pool=pool):
            out = fn()
    finally:
        gc.enable()
    return graph, out


def default_buckets(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, 257, 16))
    return [b for b in sizes if b < max_num_seqs] + [max_num_seqs]


class DecodeGraphs:
    """Static inputs per bucket b: one packed device buffer (step_inputs layout with T = B = b, token slots always
    present, block tables [b, max_blocks]) whose views the graphs of b read. A decode step of n sequences packs its
    inputs on the host padded up to the bucket (padding rows write K/V into the reserved scratch block, have
    seq_len 1, no adapter and zero block-table rows; unused table columns are zero), copies them with ONE
    non_blocking H2D copy, replays, and reads the first n rows of logits. No LoRA meta is built on the host: the
    graph rebuilds it from its token-slot view. When the largest bucket's full-width tables exceed FULL_TABLE_BYTES
    (long max_model_len), the copy carries only the step's [b, w] tables, and two launches widen them into a
    static [bmax, max_blocks] table. Attention runs its graph-safe decode path: ForwardContext.seq_lens_list /
    query_lens are None, and max_seq_len bounds the KV length."""

    def __init__(self, runner, buckets: list[int], scratch_block: int):
        self.runner, self.buckets = runner, sorted(buckets)
        dev, bmax = runner.device, self.buckets[-1]
        self.max_blocks = runner.max_blocks_per_seq
        self.scratch_slot = scratch_block * runner.block_size
        self.full_tables = bmax * self.max_blocks * 4 <= FULL_TABLE_BYTES
        self.layouts = {b: Layout(b, 0, b, b, self.max_blocks) for b in self.buckets}
        self.packed = {b: torch.empty(lay.words, dtype=torch.int64, device=dev) for b, lay in self.layouts.items()}
        self.inputs = {b: views(self.packed[b], lay) for b, lay in self.layouts.items()}
        self.block_tables = None if self.full_tables else torch.zeros(bmax, self.max_blocks, dtype=torch.int32,
                                                                      device=dev)
        self.rows = torch.arange(bmax, dtype=torch.int64, device=dev)
        self.pool = None
        self.graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        for b in self.buckets:  # all rows padding: valid inputs for the capture's warm-up runs
            self.stage(([], [], [], [], [], [], [], None), b)

    def _ctx(self, b: int, lora: bool) -> ForwardContext:
        t, meta = self.inputs[b], None
        if lora:
            from loramux.kernels.lora import LoRAMeta, build_lora_meta

            slots = self.runner.lora_slots
            meta = build_lora_meta(t.token_slots, slots.num_slots,
                                   out=LoRAMeta.empty(b, slots.num_slots, self.runner.device))
        tables = t.block_tables if self.full_tables else self.block_tables[:b]
        return ForwardContext(positions=t.positions, slot_mapping=t.slot_mapping, block_tables=tables,
                              seq_lens=t.seq_lens, seq_lens_list=None, query_lens=None, logits_indices=self.rows[:b],
                              lora_meta=meta, lora_backend=self.runner.kernel_backend,
                              max_seq_len=self.max_blocks * self.runner.block_size)

    def _forward(self, b: int, lora: bool) -> torch.Tensor:
        model = self.runner.model
        ctx = self._ctx(b, lora)  # LoRA meta is rebuilt inside the graph from the static token_slots view
        return model.compute_logits(model(self.inputs[b].ids, ctx, self.runner.kv_caches))

    @torch.inference_mode()
    def capture(self) -> None:
        t0 = time.monotonic()
        self.pool = torch.cuda.graph_pool_handle()
        variants = (False, True) if self.runner.lora_slots is not None else (False,)
        for b in reversed(self.buckets):
            for lora in variants:
                self.graphs[(b, lora)] = capture_graph(lambda: self._forward(b, lora), self.pool)
        torch.cuda.synchronize()
        log.info("captured %d decode CUDA graphs (batch sizes %s) in %.1fs", len(self.graphs), self.buckets,
                 time.monotonic() - t0)

    def bucket_for(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)

    def stage(self, host, b: int | None = None) -> tuple[int, bool] | None:
        """Write a decode step's host lists (ModelRunner._host_inputs, n rows of one token each) padded to bucket
        b (default: the smallest that fits) into b's static inputs -> (b, lora), or None when no bucket fits."""
        b = self.bucket_for(len(host[0])) if b is None else b
        if b is None:
            return None
        lay, out = self.layouts[b], self.packed[b]
        if not self.full_tables:
            tables = host[3]
            w = len(tables[0]) if tables else 0
            lay = Layout(b, 0, b, b, w)  # the same offsets; the table section holds [b, w]
            out = out[:lay.words]
        self.runner.staging.stage(lay, host, self.scratch_slot, out=out)  # the one H2D copy
        if not self.full_tables:
            static = self.block_tables[:b]
            static[:, :w].copy_(views(out, lay).block_tables)
            static[:, w:].zero_()
        return b, host[7] is not None

    def replay(self, b: int, lora: bool, n: int) -> torch.Tensor:
        """-> logits [n, V] of a step staged for bucket b (a view into the graph's output)."""
        graph, out = self.graphs[(b, lora)]
        graph.replay()
        return out[:n]

    def run(self, host) -> torch.Tensor:
        """stage + replay; host must fit a bucket."""
        b, lora = self.stage(host)
        return self.replay(b, lora, len(host[0]))
