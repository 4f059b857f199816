"""ModelRunner: builds the model and KV cache, turns a ScheduledBatch into tensors, runs forward + sampling."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from loramux.server.engine.request import TokenLogprob
from loramux.server.engine.sampler import SampleRow, Sampler
from loramux.server.engine.scheduler import ScheduledBatch
from loramux.server.models.forward_context import ForwardContext
from loramux.server.models.llama import DecoderModel
from loramux.server.models.model_config import ModelConfig
from loramux.server.models.weights import init_random_weights, load_weights

log = logging.getLogger("loramux.runner")


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
        self.last_forward_s = 0.0
        self.max_model_len = max_model_len
        self.graphs = None  # cuda_graphs.DecodeGraphs once enable_cuda_graphs() ran
        from loramux.kernels.lora import resolve_backend

        self.kernel_backend = resolve_backend(kernel_backend, self.device)  # once, not per layer call
        log.info("model ready in %.1fs: weights %.1f MiB, KV cache %d blocks x %d tokens (%.1f MiB)",
                 time.monotonic() - t0, self.weight_bytes / 2**20, num_blocks, block_size, self.kv_bytes / 2**20)

    @staticmethod
    def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        return 2 * cfg.num_layers * block_size * cfg.kv_size * torch.tensor([], dtype=dtype).element_size()

    def enable_cuda_graphs(self, max_num_seqs: int) -> None:
        """Capture decode graphs (CUDA only); call after LoRA slots are attached."""
        from .cuda_graphs import DecodeGraphs, default_buckets

        self.graphs = DecodeGraphs(self, default_buckets(max_num_seqs), scratch_block=self.num_blocks)
        self.graphs.capture()

    def _prepare(self, batch: ScheduledBatch, all_logits: bool = False):
        """-> (input_ids [T], ForwardContext, indices of requests to sample, per-token adapter slots or None).
        Under tensor parallelism rank 0 first sends the step's host inputs to the other ranks."""
        host, sample_idx = self._host_inputs(batch)
        if self.parallel is not None:
            self.parallel.broadcast_object(("step", host, all_logits))
        input_ids, ctx, token_slots = self.prepare_host(host)
        return input_ids, ctx, sample_idx, token_slots

    def _host_inputs(self, batch: ScheduledBatch):
        """-> (host lists: ids, positions, KV slots, block tables, seq lens, query lens, logit rows, per-token
        adapter slots or None; indices of requests to sample)."""
        bs = self.block_size
        ids, pos, slots, token_lora = [], [], [], []
        seq_lens, tables, logit_rows, sample_idx = [], [], [], []
        use_lora = False
        for i, (req, n) in enumerate(zip(batch.requests, batch.num_new_tokens)):
            start = req.num_computed_tokens
            ids.extend(req.token_slice(start, n))
            pos.extend(range(start, start + n))
            blocks = req.block_ids
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, start + n))
            seq_lens.append(start + n)
            tables.append(blocks)
            slot = -1
            if req.adapter_id is not None and self.lora_slots is not None:
                slot = self.lora_slots.slot_of(req.adapter_id)
                use_lora = use_lora or slot >= 0
            token_lora.extend([slot] * n)
            if start + n == req.num_tokens:  # reached the end: sample the next token
                logit_rows.append(len(ids) - 1)
                sample_idx.append(i)
        width = max(len(t) for t in tables)
        tables = [t + [0] * (width - len(t)) for t in tables]
        host = (ids, pos, slots, tables, seq_lens, list(batch.num_new_tokens), logit_rows,
                token_lora if use_lora else None)
        return host, sample_idx

    def prepare_host(self, host):
        """Host lists (see _host_inputs) -> (input_ids [T], ForwardContext, per-token adapter slots or None)."""
        ids, pos, slots, tables, seq_lens, query_lens, logit_rows, token_lora = host
        dev = self.device
        lora_meta = token_slots = None
        if token_lora is not None:
            token_slots = torch.tensor(token_lora, dtype=torch.int32, device=dev)
            lora_meta = self.lora_slots.build_meta(token_slots)
        ctx = ForwardContext(
            positions=torch.tensor(pos, dtype=torch.int64, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            seq_lens_list=seq_lens,
            query_lens=query_lens,
            logits_indices=torch.tensor(logit_rows, dtype=torch.int64, device=dev),
            lora_meta=lora_meta,
            lora_backend=self.kernel_backend,
            max_seq_len=self.max_model_len,
        )
        return torch.tensor(ids, dtype=torch.int64, device=dev), ctx, token_slots

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> dict[str, tuple[int, TokenLogprob | None]]:
        input_ids, ctx, sample_idx, token_slots = self._prepare(batch)
        t0 = time.perf_counter()
        n = len(batch.requests)
        if self.graphs is not None and input_ids.shape[0] == n and self.graphs.bucket_for(n) is not None:
            logits = self.graphs.run(input_ids, ctx, token_slots)  # decode step: every row is sampled
        else:
            hidden = self.model(input_ids, ctx, self.kv_caches)
            logits = self.model.compute_logits(hidden[ctx.logits_indices]) if sample_idx else None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # timing only; the sampler syncs anyway
        self.last_forward_s = time.perf_counter() - t0  # model compute, for the engine-overhead benchmark
        if not sample_idx:
            return {}
        rows = []
        for i in sample_idx:
            req = batch.requests[i]
            rows.append(SampleRow(req.params, req.seed, len(req.output_token_ids), req.prompt_token_ids,
                                  req.output_token_ids))
        result = self.sampler(logits, rows)
        return {batch.requests[i].request_id: (tok, lp)
                for i, tok, lp in zip(sample_idx, result.token_ids, result.logprobs)}

    @torch.inference_mode()
    def forward_logits(self, batch: ScheduledBatch) -> torch.Tensor:
        """Logits of every scheduled token (tests compare these with transformers)."""
        input_ids, ctx, _, _ = self._prepare(batch, all_logits=True)
        return self.model.compute_logits(self.model(input_ids, ctx, self.kv_caches))
