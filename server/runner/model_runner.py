"""ModelRunner: builds the model and KV cache, turns a ScheduledBatch into tensors, runs forward + sampling."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from loramux.server.engine.request import TokenLogprob
from loramux.server.engine.sampler import SampleRow, Sampler
from loramux.server.engine.scheduler import ScheduledBatch
from loramux.server.models.forward_context import ForwardContext
from loramux.server.models.llama import DecoderModel
from loramux.server.models.model_config import ModelConfig
from loramux.server.models.weights import init_random_weights, load_weights

from .step_inputs import HostStaging, host_layout, views

log = logging.getLogger("loramux.runner")


@dataclass
class Launched:
    """A step queued on the device whose sampled tokens are not read yet (ModelRunner.launch / finish)."""

    request_ids: list[str]  # the sampled requests, in row order
    logits: torch.Tensor | None  # [rows, V] (a graph's static output: read before the next replay)
    rows: list[SampleRow]
    t0: float
    feeds_next: bool  # a decode step may take its input ids from tokens_dev (not a mixed-step graph)
    tokens_dev: torch.Tensor | None = None  # [rows] int64 tokens picked on the device (Sampler.device_tokens)
    tokens_host: torch.Tensor | None = None  # pinned copy of tokens_dev (CUDA)
    event: object = None  # recorded behind that copy
    timing: tuple | None = None  # (path, start event, end event) when ModelRunner.step_times is on (CUDA)


class ModelRunner:
    def __init__(self, model_dir: Path | None, model_config: ModelConfig, dtype: torch.dtype, device: torch.device,
                 max_model_len: int, block_size: int, num_blocks: int, lora_slots=None,
                 kernel_backend: str = "torch", parallel=None):
        self.cfg, self.dtype, self.device = model_config, dtype, torch.device(device)
        self.block_size, self.num_blocks = block_size, num_blocks
        self.parallel = parallel  # distributed.parallel_state.TPState under tensor parallelism, else None
        t0 = time.monotonic()
        if parallel is None:
            self.model = DecoderModel(model_config, max_model_len, dtype, self.device).eval()
        else:
            from loramux.server.distributed.tp_layers import TPDecoderModel, load_weights_tp

            self.model = TPDecoderModel(model_config, max_model_len, dtype, self.device, parallel).eval()
        if model_dir is None:
            init_random_weights(self.model)  # a named shape for benchmarks
        elif parallel is None:
            load_weights(self.model, model_dir)
        else:
            load_weights_tp(self.model, model_dir)
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        # One extra block past the engine's num_blocks: the scratch block that CUDA-graph padding rows write to.
        shape = (num_blocks + 1, block_size, self.model.cfg.num_kv_heads, model_config.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=dtype, device=self.device),
                           torch.zeros(shape, dtype=dtype, device=self.device))
                          for _ in range(model_config.num_layers)]
        self.kv_bytes = num_blocks * self.kv_bytes_per_block(self.model.cfg, block_size, dtype)  # this rank's share
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.sampler = Sampler(model_config.vocab_size)
        self.lora_slots = lora_slots  # runner.lora_slots.LoRASlots or None
        self.staging = HostStaging(self.device)  # the step's packed host buffers (pinned on CUDA)
        self.last_forward_s = 0.0  # see finish()
        self.step_kinds = {"decode_graph": 0, "mixed_graph": 0, "eager": 0}  # launches by path (benchmarks)
        self.step_times: dict[str, list[float]] | None = None  # {} turns on: device ms per step, by path (CUDA)
        self.sync_timing = False  # engine benchmark: sync after the forward so last_forward_s is the forward alone
        self._tok_bufs: list[torch.Tensor | None] = [None, None]  # pinned targets of launch()'s device tokens
        self._tok_ring = 0
        self.max_model_len = max_model_len
        self.graphs = None  # cuda_graphs.DecodeGraphs once enable_cuda_graphs() ran
        self.mixed_graphs = None  # mixed_graphs.MixedGraphs: steps with prefill tokens, when enabled
        from loramux.kernels.lora import resolve_backend

        self.kernel_backend = resolve_backend(kernel_backend, self.device)  # once, not per layer call
        log.info("model ready in %.1fs: weights %.1f MiB, KV cache %d blocks x %d tokens (%.1f MiB)",
                 time.monotonic() - t0, self.weight_bytes / 2**20, num_blocks, block_size, self.kv_bytes / 2**20)

    @staticmethod
    def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        return 2 * cfg.num_layers * block_size * cfg.kv_size * torch.tensor([], dtype=dtype).element_size()

    def enable_cuda_graphs(self, max_num_seqs: int, max_num_batched_tokens: int = 0) -> None:
        """Capture decode graphs and, with max_num_batched_tokens > 0, graphs for steps of up to that many tokens
        (prefill chunks and decode rows mixed; runner/mixed_graphs.py). CUDA only; call after LoRA slots are
        attached."""
        from .cuda_graphs import DecodeGraphs, default_buckets
        from .mixed_graphs import MixedGraphs, default_token_buckets

        self.graphs = DecodeGraphs(self, default_buckets(max_num_seqs), scratch_block=self.num_blocks)
        self.graphs.capture()
        if max_num_batched_tokens > 0 and not MixedGraphs.fits(max_num_seqs, self.max_blocks_per_seq):
            log.info("no mixed-step CUDA graphs: block tables of %d sequences x %d blocks are too wide to copy per "
                     "step", max_num_seqs, self.max_blocks_per_seq)
        elif max_num_batched_tokens > 0:
            self.mixed_graphs = MixedGraphs(self, default_token_buckets(max_num_batched_tokens, max_num_seqs),
                                            max_num_seqs, scratch_block=self.num_blocks)
            self.mixed_graphs.capture(self.graphs.pool)

    def _prepare(self, batch: ScheduledBatch, all_logits: bool = False):
        """-> (input_ids [T], ForwardContext, indices of requests to sample, per-token adapter slots or None)."""
        host, sample_idx = self._host_and_broadcast(batch, all_logits)
        input_ids, ctx, token_slots = self.prepare_host(host)
        return input_ids, ctx, sample_idx, token_slots

    def _host_and_broadcast(self, batch: ScheduledBatch, all_logits: bool):
        """Under tensor parallelism rank 0 first sends the step's host inputs to the other ranks."""
        host, sample_idx = self._host_inputs(batch)
        if self.parallel is not None:
            self.parallel.broadcast_object(("step", host, all_logits))
        return host, sample_idx

    def _host_inputs(self, batch: ScheduledBatch):
        """-> (host lists: ids, positions, KV slots, block tables (rows padded to one width), seq lens, query lens,
        logit rows, per-token adapter slots or None; indices of requests to sample). Plain Python: its cost per
        request is host time on every step, hence the decode (one token) fast path and one slot lookup per adapter."""
        bs, lora_slots = self.block_size, self.lora_slots
        ids, pos, slots, token_lora = [], [], [], []
        seq_lens, tables, logit_rows, sample_idx = [], [], [], []
        slot_of: dict[str, int] = {}
        use_lora = False
        for i, (req, n) in enumerate(zip(batch.requests, batch.num_new_tokens)):
            start = req.num_computed_tokens
            end = start + n
            blocks = req.block_ids
            slot, aid = -1, req.adapter_id
            if aid is not None and lora_slots is not None:
                slot = slot_of.get(aid)
                if slot is None:
                    slot = slot_of[aid] = lora_slots.slot_of(aid)
                use_lora = use_lora or slot >= 0
            ids.extend(req.token_slice(start, n))
            if n == 1:
                pos.append(start)
                slots.append(blocks[start // bs] * bs + start % bs)
                token_lora.append(slot)
            else:
                pos.extend(range(start, end))
                slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, end))
                token_lora.extend([slot] * n)
            seq_lens.append(end)
            tables.append(blocks)
            if end == req.num_tokens:  # reached the end: sample the next token
                logit_rows.append(len(ids) - 1)
                sample_idx.append(i)
        width = max(map(len, tables))
        tables = [t if len(t) == width else t + [0] * (width - len(t)) for t in tables]
        host = (ids, pos, slots, tables, seq_lens, list(batch.num_new_tokens), logit_rows,
                token_lora if use_lora else None)
        return host, sample_idx

    def prepare_host(self, host):
        """Host lists (see _host_inputs) -> (input_ids [T], ForwardContext, per-token adapter slots or None), for an
        eager forward: one packed host buffer, one copy to the device; the tensors are views of the device buffer."""
        lay = host_layout(host)
        t = views(self.staging.stage(lay, host), lay)
        meta = None if t.token_slots is None else self.lora_slots.build_meta(t.token_slots)
        ctx = ForwardContext(positions=t.positions, slot_mapping=t.slot_mapping, block_tables=t.block_tables,
                             seq_lens=t.seq_lens, seq_lens_list=host[4], query_lens=host[5],
                             logits_indices=t.logits_indices, lora_meta=meta, lora_backend=self.kernel_backend,
                             max_seq_len=self.max_model_len)
        return t.ids, ctx, t.token_slots

    def execute(self, batch: ScheduledBatch) -> dict[str, tuple[int, TokenLogprob | None]]:
        """Run one step: forward + sampling -> {request_id: (token, logprob or None)} of the sampled requests."""
        return self.finish(self.launch(batch))

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, device_tokens: bool = False, ids_from: "Launched | None" = None):
        """Queue a step's forward (no sync) -> Launched, for finish(). device_tokens: when no sampled row needs
        host data (Sampler.host_free: no penalty, no logprobs), pick the tokens on the device and start their copy
        to the host (Launched.tokens_dev), so a next decode step can be launched from them before the host reads
        them. ids_from: a decode step's input ids are the tokens of that earlier launch (same requests, same
        order), not the host's placeholders."""
        start = None
        if self.step_times is not None and self.device.type == "cuda":  # queued behind the previous step's work
            start = torch.cuda.Event(enable_timing=True)
            start.record()
        host, sample_idx = self._host_and_broadcast(batch, False)
        n = len(batch.requests)
        # A decode step (one token per sequence) that fits a bucket replays a graph: its inputs go straight into the
        # graph's static buffer, and no LoRA meta is built here (the graph rebuilds it).
        staged = self.graphs.stage(host) if self.graphs is not None and len(host[0]) == n else None
        mixed = None
        if staged is None and self.mixed_graphs is not None:  # prefill tokens: a mixed-step graph if one fits
            mixed = self.mixed_graphs.stage(host)
        if staged is None and mixed is None:
            input_ids, ctx, _ = self.prepare_host(host)
        if ids_from is not None:  # queued after the staging copy, so it overwrites the placeholders
            if mixed is not None:
                raise ValueError("ids_from needs a decode-graph or eager step")
            ids = self.graphs.inputs[staged[0]].ids if staged is not None else input_ids
            ids[:n].copy_(ids_from.tokens_dev[:n])
        path = "decode_graph" if staged is not None else "mixed_graph" if mixed is not None else "eager"
        self.step_kinds[path] += 1
        t0 = time.perf_counter()
        if staged is not None:
            logits = self.graphs.replay(*staged, n)  # every row is sampled
        elif mixed is not None:
            logits = self.mixed_graphs.replay(*mixed, len(host[6]))
        else:
            hidden = self.model(input_ids, ctx, self.kv_caches)
            logits = self.model.compute_logits(hidden[ctx.logits_indices]) if sample_idx else None
        if host[7] is not None:  # a later copy into one of these slots waits for this step (LoRASlots.last_use)
            self.lora_slots.note_use(host[7])
        if self.sync_timing and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.last_forward_s = time.perf_counter() - t0  # see finish()
        rows = []
        for i in sample_idx:
            req = batch.requests[i]
            rows.append(SampleRow(req.params, req.seed, len(req.output_token_ids), req.prompt_token_ids,
                                  req.output_token_ids))
        out = Launched([batch.requests[i].request_id for i in sample_idx], logits, rows, t0, mixed is None)
        if start is not None:
            out.timing = (path, start, torch.cuda.Event(enable_timing=True))
            out.timing[2].record()
        if device_tokens and rows and all(Sampler.host_free(r.params) for r in rows):
            out.tokens_dev = self.sampler.device_tokens(logits, rows)
            if self.device.type == "cuda":  # the host copy starts now; finish() waits for its event only
                self._tok_ring = (self._tok_ring + 1) % 2
                buf = self._tok_bufs[self._tok_ring]
                if buf is None or buf.numel() < len(rows):
                    buf = self._tok_bufs[self._tok_ring] = torch.empty(max(len(rows), 256), dtype=torch.int64,
                                                                       pin_memory=True)
                out.tokens_host = buf[:len(rows)]
                out.tokens_host.copy_(out.tokens_dev, non_blocking=True)
                out.event = torch.cuda.Event()
                out.event.record()
        return out

    @torch.inference_mode()
    def finish(self, launched: "Launched") -> dict[str, tuple[int, TokenLogprob | None]]:
        """Wait for a launched step's tokens -> {request_id: (token, logprob or None)}.
        last_forward_s: on CPU, or with sync_timing, the forward from its first launch to its completion. Else on
        CUDA (no timing-only sync) from the first launch to the sampled tokens on the host: forward + sampling, as
        reading the sampled ids is the step's only sync; a step that samples nothing records the launches."""
        if not launched.request_ids:
            return {}
        if launched.tokens_dev is not None:
            if launched.event is not None:
                if self.lora_slots is not None and self.lora_slots.async_copies:
                    self.lora_slots.wait_for(launched.event)  # issues staged slot copies meanwhile
                else:
                    launched.event.synchronize()
                tokens = launched.tokens_host.tolist()
            else:
                tokens = launched.tokens_dev.tolist()
            logprobs = [None] * len(tokens)
        else:
            result = self.sampler(launched.logits, launched.rows)
            tokens, logprobs = result.token_ids, result.logprobs
        if not self.sync_timing and self.device.type == "cuda":
            self.last_forward_s = time.perf_counter() - launched.t0
        if launched.timing is not None:
            path, start, end = launched.timing
            end.synchronize()  # already done: recorded before the tokens' copy
            self.step_times.setdefault(path, []).append(start.elapsed_time(end))
        return dict(zip(launched.request_ids, zip(tokens, logprobs)))

    @torch.inference_mode()
    def forward_logits(self, batch: ScheduledBatch) -> torch.Tensor:
        """Logits of every scheduled token (tests compare these with transformers)."""
        input_ids, ctx, _, _ = self._prepare(batch, all_logits=True)
        return self.model.compute_logits(self.model(input_ids, ctx, self.kv_caches))
