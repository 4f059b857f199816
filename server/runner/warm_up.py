"""Compile the kernel variants of eager (prefill / mixed) steps before serving.

Triton compiles a kernel again for every new combination of constexprs and integer specializations (an int
argument == 1 or % 16 == 0). Decode steps replay CUDA graphs captured at start, but eager steps choose LoRA launch
plans by their token count T, so without a warm-up the first steps of each new size stall every request for the
~1 s of a compile. warm_up() runs one eager forward per distinct launch key, writing K/V only into the scratch
block (the one CUDA-graph padding rows use), so no sequence's cache is touched; outputs are discarded.
"""
from __future__ import annotations

import logging
import time

import torch

log = logging.getLogger("loramux.warmup")
_GROUPS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def warm_up_sizes(runner, max_tokens: int) -> list[int]:
    """The smallest token count T in 1..max_tokens for each distinct launch key: the LoRA kernels' plans for the
    four linear groups (when adapter slots exist), the prefill attention's tile choice, T's own specialization."""
    from loramux.kernels.lora_triton import launch_key

    layer, cfg = runner.model.layers[0], runner.model.cfg
    groups = []
    if runner.lora_slots is not None:
        R = runner.lora_slots.max_rank
        groups = [(getattr(layer, g).in_features, len(getattr(layer, g).slice_sizes), R) for g in _GROUPS]
    G, cap = cfg.num_heads // cfg.num_kv_heads, runner.max_model_len
    seen: dict[tuple, int] = {}
    for T in range(1, max_tokens + 1):
        longest = min(T, cap)  # a step's longest query (sequences are split at max_model_len)
        key = (T == 1, T % 16 == 0, longest * G >= 128,
               tuple(launch_key(T, K, L, R, runner.device) for K, L, R in groups))
        seen.setdefault(key, T)
    return sorted(seen.values())


def _host(runner, T: int, lora: bool):
    """Host inputs of one eager step of T tokens: sequences of at most max_model_len tokens, every K/V slot in
    the scratch block, every token on adapter slot 0 when lora (an empty slot has rank 0: no effect)."""
    bs, scratch = runner.block_size, runner.num_blocks  # kv_caches hold num_blocks + 1 blocks
    lens = [min(runner.max_model_len, T - s) for s in range(0, T, runner.max_model_len)]
    width = -(-max(lens) // bs)
    ids, pos, slots, logit_rows = [], [], [], []
    for n in lens:
        ids += [0] * n
        pos += list(range(n))
        slots += [scratch * bs + p % bs for p in range(n)]
        logit_rows.append(len(ids) - 1)
    tables = [[scratch] * width for _ in lens]
    return ids, pos, slots, tables, lens, list(lens), logit_rows, ([0] * T if lora else None)


@torch.inference_mode()
def warm_up(runner, max_tokens: int) -> int:
    """One eager forward (+ logits) per distinct launch key, with and without adapters -> forwards run."""
    t0 = time.monotonic()
    sizes = warm_up_sizes(runner, max_tokens)
    variants = (False, True) if runner.lora_slots is not None else (False,)
    log.info("warming up eager-step kernels for %d token counts (%s); a first start compiles them, later starts "
             "read Triton's cache", len(sizes), ", ".join(map(str, sizes)))
    runs = 0
    for T in sizes:
        for lora in variants:
            input_ids, ctx, _ = runner.prepare_host(_host(runner, T, lora))
            hidden = runner.model(input_ids, ctx, runner.kv_caches)
            runner.model.compute_logits(hidden[ctx.logits_indices])
            runs += 1
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)
    log.info("warm-up done: %d eager forwards in %.1fs", runs, time.monotonic() - t0)
    return runs
