"""Top-p bound by search (kernels/top_p_triton.py, LORAMUX_TOP_P_SEARCH): under TRITON_INTERPRET=1 the same bound
as the sampler's sort + scan (ties, -inf logits, tiny and full top_p) and the same tokens as the torch sampler and
the single-row reference; on the GPU at the Llama-3 vocabulary."""
from __future__ import annotations

import importlib.util
import os
import random

import pytest
import torch

from test_sampler import _row, reference_token
from triton_interp import run_triton_cases
from loramux.server.engine.request import SamplingParams as SP
from loramux.server.engine.sampler import Sampler

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
interp = pytest.mark.skipif(not (HAS_TRITON and INTERPRET), reason="needs TRITON_INTERPRET=1 (test_interpreter_suite)")


def sort_bound(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The sampler's sort path: lowest kept logit of the smallest best-first prefix whose mass reaches top_p."""
    vals = x.sort(dim=-1, descending=True, stable=True).values
    probs = vals.softmax(-1)
    keep = ((probs.cumsum(-1) - probs) < p[:, None])
    thr = vals.gather(1, keep.sum(-1, keepdim=True).clamp(min=1) - 1)
    return torch.where(p[:, None] >= 1.0, float("-inf"), thr)


@interp
@pytest.mark.parametrize("vocab", [2, 7, 50, 1000, 3000])
def test_bound_equals_sort_path(vocab):
    from loramux.kernels.top_p_triton import top_p_threshold
    torch.manual_seed(vocab)
    for scale in (0.3, 3.0, 12.0):
        x = torch.randn(7, vocab) * scale
        x[0, : vocab // 3] = float("-inf")  # masked tokens
        x[1] = x[1].round()  # ties at the bound
        x[2] = 1.5  # all equal
        p = torch.tensor([0.9, 0.5, 0.95, 1e-4, 1.0, 0.7, 0.999])
        assert torch.equal(top_p_threshold(x, p), sort_bound(x, p))


@interp
@pytest.mark.parametrize("vocab,batch", [(50, 16), (3000, 3)])
def test_sampler_with_search_equals_torch_and_reference(vocab, batch):
    rng = random.Random(vocab)
    torch.manual_seed(vocab)
    search, plain = Sampler(vocab, fused="on"), Sampler(vocab, fused="off")
    search.top_p_search = True
    for _ in range(3):
        rows = [_row(SP(temperature=rng.choice([0.5, 1.0, 1.6]), top_p=rng.choice([0.3, 0.9, 1.0]),
                        min_p=rng.choice([0.0, 0.1])), seed=rng.getrandbits(64), index=rng.randrange(99),
                     prompt=[1], output=[2]) for _ in range(batch)]
        logits = torch.randn(batch, vocab) * 3
        got = search.device_tokens(logits, rows).tolist()
        assert got == plain.device_tokens(logits, rows).tolist()
        assert got == [reference_token(logits[i], r) for i, r in enumerate(rows)]


@pytest.mark.skipif(not HAS_TRITON or INTERPRET, reason="triton missing, or the cases already run in-process")
def test_interpreter_suite():
    run_triton_cases(__file__, "bound_equals or with_search", {}, allow_skips=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_at_llama3_vocab():
    """[32, 128256]: the searched bound equals the sort path's in (nearly) every row (they sum masses in different
    orders), and the sampled tokens agree in (nearly) every row."""
    from loramux.kernels.top_p_triton import top_p_threshold
    rng, vocab = random.Random(3), 128256
    search, plain = Sampler(vocab, fused="on"), Sampler(vocab, fused="off")
    search.top_p_search = True
    bound_diff = tok_diff = 0
    for _ in range(10):
        x = torch.randn(32, vocab, device="cuda") * rng.choice([1.0, 3.0, 8.0])
        p = torch.tensor([rng.choice([0.5, 0.9, 0.95]) for _ in range(32)], device="cuda")
        bound_diff += int((top_p_threshold(x, p) != sort_bound(x, p)).sum())
        rows = [_row(SP(temperature=0.8, top_p=float(p[i])), seed=rng.getrandbits(64), index=1, prompt=[1],
                     output=[2]) for i in range(32)]
        a, b = search.device_tokens(x, rows).tolist(), plain.device_tokens(x, rows).tolist()
        tok_diff += sum(u != v for u, v in zip(a, b))
    assert bound_diff <= 3 and tok_diff <= 3, (bound_diff, tok_diff)
