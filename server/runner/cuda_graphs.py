"""CUDA graphs for decode steps: captured once per bucketed batch size (with and without LoRA), replayed per step."""
from __future__ import annotations

import logging
import time

import torch

from loramux.server.models.forward_context import ForwardContext

log = logging.getLogger("loramux.graphs")


def default_buckets(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, 257, 16))
    return [b for b in sizes if b < max_num_seqs] + [max_num_seqs]


class DecodeGraphs:
    """Static input buffers sized for the largest bucket; a decode step of n sequences copies its inputs into the
    first n rows, pads up to the bucket (padding rows write K/V into the reserved scratch block and have no
    adapter), replays, and reads the first n rows of logits. Attention runs its graph-safe decode path:
    ForwardContext.seq_lens_list / query_lens are None, and max_seq_len bounds the KV length."""

    def __init__(self, runner, buckets: list[int], scratch_block: int):
        self.runner, self.buckets = runner, sorted(buckets)
        dev, bmax = runner.device, self.buckets[-1]
        self.max_blocks = runner.max_blocks_per_seq
        self.scratch_slot = scratch_block * runner.block_size
        i64, i32 = dict(dtype=torch.int64, device=dev), dict(dtype=torch.int32, device=dev)
        self.ids = torch.zeros(bmax, **i64)
        self.positions = torch.zeros(bmax, **i64)
        self.slot_mapping = torch.full((bmax,), self.scratch_slot, **i64)
        self.block_tables = torch.zeros(bmax, self.max_blocks, **i32)
        self.seq_lens = torch.ones(bmax, **i32)
        self.token_slots = torch.full((bmax,), -1, **i32)
        self.rows = torch.arange(bmax, **i64)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def _ctx(self, b: int, lora: bool) -> ForwardContext:
        meta = None
        if lora:
            from loramux.kernels.lora import LoRAMeta, build_lora_meta

            slots = self.runner.lora_slots
            meta = build_lora_meta(self.token_slots[:b], slots.num_slots,
                                   out=LoRAMeta.empty(b, slots.num_slots, self.runner.device))
        return ForwardContext(positions=self.positions[:b], slot_mapping=self.slot_mapping[:b],
                              block_tables=self.block_tables[:b], seq_lens=self.seq_lens[:b], seq_lens_list=None,
                              query_lens=None, logits_indices=self.rows[:b], lora_meta=meta,
                              lora_backend=self.runner.kernel_backend,
                              max_seq_len=self.max_blocks * self.runner.block_size)

    def _forward(self, b: int, lora: bool) -> torch.Tensor:
        model = self.runner.model
        ctx = self._ctx(b, lora)  # LoRA meta is rebuilt inside the graph from the static token_slots buffer
        return model.compute_logits(model(self.ids[:b], ctx, self.runner.kv_caches))

    @torch.inference_mode()
    def capture(self) -> None:
        t0 = time.monotonic()
        variants = (False, True) if self.runner.lora_slots is not None else (False,)
        for b in reversed(self.buckets):
            for lora in variants:
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(2):  # warm-up: Triton autotuning / lazy init outside the capture
                        self._forward(b, lora)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    out = self._forward(b, lora)
                self.graphs[(b, lora)] = (graph, out)
        torch.cuda.synchronize()
        log.info("captured %d decode CUDA graphs (batch sizes %s) in %.1fs", len(self.graphs), self.buckets,
                 time.monotonic() - t0)

    def bucket_for(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)

    def run(self, ids: torch.Tensor, ctx: ForwardContext, token_slots: torch.Tensor | None) -> torch.Tensor:
        """Replay for a decode batch of n = len(ids) rows -> logits [n, V] (a view into the graph's output)."""
        n = ids.shape[0]
        b = self.bucket_for(n)
        self.ids[:n].copy_(ids)
        self.positions[:n].copy_(ctx.positions)
        self.slot_mapping[:n].copy_(ctx.slot_mapping)
        self.slot_mapping[n:b].fill_(self.scratch_slot)
        width = ctx.block_tables.shape[1]
        self.block_tables[:n, :width].copy_(ctx.block_tables)
        self.block_tables[:n, width:].zero_()
        self.block_tables[n:b].zero_()
        self.seq_lens[:n].copy_(ctx.seq_lens)
        self.seq_lens[n:b].fill_(1)
        lora = token_slots is not None
        if lora:
            self.token_slots[:n].copy_(token_slots)
            self.token_slots[n:b].fill_(-1)
        graph, out = self.graphs[(b, lora)]
        graph.replay()
        return out[:n]
