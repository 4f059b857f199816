"""Run the offline engine on a model folder and collect each request's tokens (shared by engine tests)."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from loramux.server.engine.request import SamplingParams
from loramux.server.engine.scheduler import SchedulerConfig
from loramux.server.models.model_config import ModelConfig
from loramux.server.runtime import build_engine


def make_engine(model_dir: Path, num_blocks: int = 64, budget: int = 512, max_seqs: int = 32,
                max_model_len: int = 256, max_loras: int = 4, gate=None, lora_slots=None,
                kernel_backend: str = "auto"):
    cfg = ModelConfig.from_dir(model_dir)
    sched = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, max_model_len=max_model_len,
                            max_loras=max_loras)
    return build_engine(model_dir, cfg, torch.float32, torch.device("cpu"), max_model_len, num_blocks, sched,
                        [], kernel_backend=kernel_backend, gate=gate, lora_slots=lora_slots)


def run_all(engine, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
            adapters: list[str | None] | None = None, timeout_s: float = 300, stagger: int = 0) -> list[list[int]]:
    """Add every prompt (with stagger > 0: one every `stagger` steps, so prompts land in steps with decode rows),
    step until all finish; returns output token ids per prompt."""
    plist = params if isinstance(params, list) else [params] * len(prompts)
    adapters = adapters or [None] * len(prompts)
    out: dict[str, list[int]] = {}
    for i, (p, sp, a) in enumerate(zip(prompts, plist, adapters)):
        engine.add_request(f"q{i}", p, sp, a)
        out[f"q{i}"] = []
        for _ in range(stagger):
            for o in engine.step():
                out[o.request_id].extend(o.new_token_ids)
    deadline = time.monotonic() + timeout_s
    while engine.has_work() and time.monotonic() < deadline:
        for o in engine.step():
            out[o.request_id].extend(o.new_token_ids)
        if engine.last_step.num_requests == 0:
            time.sleep(0.001)  # nothing runnable: an adapter is still loading in the background
    assert not engine.has_work(), "engine did not finish"
    return [out[f"q{i}"] for i in range(len(prompts))]
