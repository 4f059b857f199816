"""One decoder for Llama 2/3, Mistral and Qwen2: packed qkv / gate_up, GQA, RoPE, paged KV cache."""
from __future__ import annotations

import torch
from torch import nn

from loramux.kernels.attention import paged_attention, paged_attention_table, write_kv

from .forward_context import ForwardContext
from .layers import PackedLinear, RMSNorm
from .model_config import ModelConfig
from .rope import RotaryEmbedding

# LoRA target module -> (packed linear attribute, slice index)
LORA_TARGETS = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2), "o_proj": ("o_proj", 0),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1), "down_proj": ("down_proj", 0),
}


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding, dtype, device):
        super().__init__()
        self.cfg, self.rope = cfg, rope
        h = cfg.hidden_size
        self.input_layernorm = RMSNorm(h, cfg.rms_norm_eps, dtype, device)
        self.post_attention_layernorm = RMSNorm(h, cfg.rms_norm_eps, dtype, device)
        self.qkv_proj = PackedLinear(h, [cfg.q_size, cfg.kv_size, cfg.kv_size], cfg.qkv_bias, dtype, device)
        self.o_proj = PackedLinear(cfg.q_size, [h], cfg.o_bias, dtype, device)
        self.gate_up_proj = PackedLinear(h, [cfg.intermediate_size] * 2, cfg.mlp_bias, dtype, device)
        self.down_proj = PackedLinear(cfg.intermediate_size, [h], cfg.mlp_bias, dtype, device)
        self.scale = cfg.head_dim ** -0.5

    def _attention(self, h: torch.Tensor, ctx: ForwardContext, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Normed hidden [T, hidden] -> o_proj output [T, hidden] (no residual)."""
        cfg = self.cfg
        T = h.shape[0]
        fused = self.input_layernorm.fused_backend  # fused ops on (default): one launch for split + RoPE + KV write
        if fused is not None:
            rope = (ctx.positions, self.rope.cos, self.rope.sin, kv[0], kv[1], ctx.slot_mapping, cfg.num_heads,
                    cfg.num_kv_heads, cfg.head_dim)
            q = self.qkv_proj.rope_write_kv(h, ctx, rope, fused)
        else:  # unfused reference path (LORAMUX_FUSED_OPS=0)
            qkv = self.qkv_proj(h, ctx)  # [T, q_size + 2 * kv_size]
            q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
            q = q.reshape(T, cfg.num_heads, cfg.head_dim)
            k = k.reshape(T, cfg.num_kv_heads, cfg.head_dim)
            v = v.reshape(T, cfg.num_kv_heads, cfg.head_dim)
            q, k = self.rope(ctx.positions, q, k)
            write_kv(k, v, kv[0], kv[1], ctx.slot_mapping)
        if ctx.attn_work is not None:  # a mixed-step graph: no host lists, the launch reads a device work table
            attn = paged_attention_table(q, kv[0], kv[1], ctx.block_tables, ctx.seq_lens, ctx.attn_cu_q,
                                         ctx.attn_work, self.scale, cfg.sliding_window, backend="triton")
        else:
            attn = paged_attention(q, kv[0], kv[1], ctx.block_tables, ctx.seq_lens, ctx.seq_lens_list,
                                   ctx.query_lens, self.scale, cfg.sliding_window)
        return self.o_proj(attn.reshape(T, cfg.q_size), ctx)

    def forward(self, x: torch.Tensor, ctx: ForwardContext, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = x + self._attention(self.input_layernorm(x), ctx, kv)
        gate, up = self.gate_up_proj(self.post_attention_layernorm(x), ctx).chunk(2, dim=-1)
        return x + self.down_proj(nn.functional.silu(gate) * up, ctx)

    def forward_fused(self, x: torch.Tensor, residual: torch.Tensor | None, ctx: ForwardContext,
                      kv: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused-ops path (the default), residual stream carried separately (x + residual is the stream):
        -> (this layer's MLP output, stream before it); same math as forward()."""
        h, residual = self.input_layernorm.fused(x, residual)
        h, residual = self.post_attention_layernorm.fused(self._attention(h, ctx, kv), residual)
        act = self.gate_up_proj.silu_mul(h, ctx, self.post_attention_layernorm.fused_backend)
        return self.down_proj(act, ctx), residual


class DecoderModel(nn.Module):
    """forward(input_ids [T], ctx, kv_caches) -> hidden [T, hidden]; compute_logits(hidden [N, hidden]) -> fp32."""

    def __init__(self, cfg: ModelConfig, max_model_len: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device)
        self.embed_tokens.weight.requires_grad_(False)
        rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings,
                               max_model_len, device)
        self.layers = nn.ModuleList(DecoderLayer(cfg, rope, dtype, device) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.lm_head = (None if cfg.tie_word_embeddings else
                        nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device),
                                     requires_grad=False))

    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        if self.norm.fused_backend is not None:  # fused ops on (default), read when the model was built
            residual = None
            for layer, kv in zip(self.layers, kv_caches):
                x, residual = layer.forward_fused(x, residual, ctx, kv)
            return self.norm.fused(x, residual)[0]
        for layer, kv in zip(self.layers, kv_caches):
            x = layer(x, ctx, kv)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        w = self.embed_tokens.weight if self.lm_head is None else self.lm_head
        return nn.functional.linear(hidden, w).float()
