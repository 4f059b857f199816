"""CUDA graphs for any step (prefill chunks mixed with decode rows), captured once per token-count bucket.

Eager steps cost 30-100 ms of host time on an 8B model (hundreds of Triton launches at ~50 us each), against ~10 ms
of GPU time for a batch-64 decode step, so a step with one new prompt ran at a fraction of the speed of a pure
decode step. Here every launch of the forward reads only static buffers: the step's inputs are padded up to the
bucket's T tokens / max_num_seqs sequences / max_num_seqs logit rows and written with the step's one H2D copy
(step_inputs.Layout with E > 0 adds cu_q and the attention work table), attention runs its table-driven form
(kernels/attention.py paged_attention_table), and the LoRA meta is rebuilt inside the graph from the token slots.
Padding tokens write K/V into the scratch block and belong to no sequence; padding sequences have no query tokens
and no work entries; padding logit rows read row 0.
"""
from __future__ import annotations

import logging
import time

import torch

from loramux.kernels.attention import prefill_table_block_m, prefill_table_capacity
from loramux.server.models.forward_context import ForwardContext

from .step_inputs import Layout, views

log = logging.getLogger("loramux.graphs")
MAX_TABLE_BYTES = 1 << 20  # full-width block tables [max_num_seqs, max_blocks] int32 up to this travel per step


def default_token_buckets(max_tokens: int, max_seqs: int) -> list[int]:
    """Powers of two and their midpoints below 512 tokens, quarter steps from 512 (there a step is bound by compute,
    not by reading the weights, so padding up to the bucket is paid in full: at most ~25% instead of ~50%), from
    the next bucket above max_seqs (a mixed step has at least one token more than its decode rows) up to
    max_tokens, which is always the last bucket."""
    sizes, t = [], 64
    while t < max_tokens:
        parts = 2 if t < 512 else 4
        sizes += [t + t * i // parts for i in range(parts)]
        t *= 2
    return [s for s in sizes if max_seqs < s < max_tokens] + [max_tokens]


class MixedGraphs:
    """Static inputs per bucket T (Layout(T, L=B, B=max_seqs, TL=T, W=max_blocks, E=work capacity)); graphs per
    (T, with adapters or not). stage() -> (T, lora) or None when the step does not fit (eager fallback)."""

    def __init__(self, runner, buckets: list[int], max_seqs: int, scratch_block: int):
        self.runner, self.buckets, self.max_seqs = runner, sorted(buckets), max_seqs
        cfg, dev = runner.model.cfg, runner.device
        self.tiles = (cfg.num_heads // cfg.num_kv_heads,
                      prefill_table_block_m(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim))
        self.max_blocks = runner.max_blocks_per_seq
        self.scratch_slot = scratch_block * runner.block_size
        self.layouts = {T: Layout(T, max_seqs, max_seqs, T, self.max_blocks,
                                  prefill_table_capacity(T, max_seqs, *self.tiles)) for T in self.buckets}
        self.packed = {T: torch.empty(lay.words, dtype=torch.int64, device=dev) for T, lay in self.layouts.items()}
        self.inputs = {T: views(self.packed[T], lay) for T, lay in self.layouts.items()}
        self.graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        for T in self.buckets:  # all padding: valid inputs for the capture's warm-up runs
            self.stage(([], [], [], [], [], [], [], None), T)

    @staticmethod
    def fits(max_seqs: int, max_blocks: int) -> bool:
        return max_seqs * max_blocks * 4 <= MAX_TABLE_BYTES

    def _ctx(self, T: int, lora: bool) -> ForwardContext:
        t, meta = self.inputs[T], None
        if lora:
            from loramux.kernels.lora import LoRAMeta, build_lora_meta

            slots = self.runner.lora_slots
            meta = build_lora_meta(t.token_slots, slots.num_slots,
                                   out=LoRAMeta.empty(T, slots.num_slots, self.runner.device))
        return ForwardContext(positions=t.positions, slot_mapping=t.slot_mapping, block_tables=t.block_tables,
                              seq_lens=t.seq_lens, seq_lens_list=None, query_lens=None,
                              logits_indices=t.logits_indices, lora_meta=meta, lora_backend=self.runner.kernel_backend,
                              max_seq_len=self.max_blocks * self.runner.block_size, attn_cu_q=t.cu_q,
                              attn_work=t.work)

    def forward(self, T: int, lora: bool) -> torch.Tensor:
        """The bucket's forward on its static inputs -> logits [max_seqs, V] (what the graph captures)."""
        model, ctx = self.runner.model, self._ctx(T, lora)
        hidden = model(self.inputs[T].ids, ctx, self.runner.kv_caches)
        return model.compute_logits(hidden[ctx.logits_indices])

    @torch.inference_mode()
    def capture(self, pool=None) -> None:
        from .cuda_graphs import capture_graph

        t0 = time.monotonic()
        variants = (False, True) if self.runner.lora_slots is not None else (False,)
        for T in reversed(self.buckets):  # largest first: smaller graphs reuse its pool memory
            for lora in variants:
                self.graphs[(T, lora)] = capture_graph(lambda: self.forward(T, lora), pool)
        torch.cuda.synchronize()
        log.info("captured %d mixed-step CUDA graphs (token buckets %s, %d sequences) in %.1fs", len(self.graphs),
                 self.buckets, self.max_seqs, time.monotonic() - t0)

    def bucket_for(self, host) -> int | None:
        ids, seq_lens, logit_rows = host[0], host[4], host[6]
        if len(seq_lens) > self.max_seqs or len(logit_rows) > self.max_seqs:
            return None
        return next((T for T in self.buckets if T >= len(ids)), None)

    def stage(self, host, T: int | None = None) -> tuple[int, bool] | None:
        """Write a step's host lists (ModelRunner._host_inputs) padded to bucket T (default: the smallest that
        fits) into T's static inputs with one H2D copy -> (T, lora), or None when no bucket fits."""
        T = self.bucket_for(host) if T is None else T
        if T is None or (host[3] and len(host[3][0]) > self.max_blocks):
            return None
        self.runner.staging.stage(self.layouts[T], host, self.scratch_slot, out=self.packed[T],
                                  attn_tiles=self.tiles)
        return T, host[7] is not None

    def replay(self, T: int, lora: bool, n_rows: int) -> torch.Tensor:
        """-> logits [n_rows, V] of a step staged for bucket T; without a captured graph (CPU tests) the same
        forward runs eagerly."""
        hit = self.graphs.get((T, lora))
        if hit is None:
            return self.forward(T, lora)[:n_rows]
        hit[0].replay()
        return hit[1][:n_rows]
