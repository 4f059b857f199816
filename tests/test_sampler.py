"""Sampler vs a per-row reference, seeded batch invariance, sampling statistics, logprobs."""
from __future__ import annotations

import math
import random

import pytest
import torch

from loramux.server.engine.request import SamplingParams as SP
from loramux.server.engine.noise import gumbel_noise, row_keys
from loramux.server.engine.sampler import SampleRow, Sampler


def _row(params: SP, seed: int = 0, index: int = 0, prompt=(), output=()) -> SampleRow:
    return SampleRow(params, seed, index, list(prompt), list(output))


def reference_token(logits: torch.Tensor, row: SampleRow) -> int:
    """Straightforward single-row sampler (vLLM formulation), sharing only the noise function."""
    p, x = row.params, logits.double().clone()
    v = x.shape[0]
    if p.repetition_penalty != 1.0:
        for t in set(row.prompt_ids) | set(row.output_ids):
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in set(row.output_ids):
        x[t] -= p.frequency_penalty * row.output_ids.count(t) + p.presence_penalty
    if p.temperature < 1e-5 or p.top_k == 1:
        return int(x.argmax())
    x = x / p.temperature
    if 0 < p.top_k < v:
        x[x < torch.sort(x).values[v - p.top_k]] = -math.inf
    if p.top_p < 1.0:  # ascending sort; drop the tokens whose cumulative mass is <= 1 - p (keep the best)
        srt, idx = torch.sort(x)
        cum = srt.softmax(-1).cumsum(-1)
        drop = cum <= 1 - p.top_p
        drop[-1] = False
        x[idx[drop]] = -math.inf
    if p.min_p > 0:
        probs = x.softmax(-1)
        x[probs < p.min_p * probs.max()] = -math.inf
    keys = torch.tensor([row_keys(row.seed, row.output_index)])
    return int((x.float() + gumbel_noise(torch.arange(v), keys)[0]).argmax())


def _random_params(rng: random.Random, vocab: int) -> SP:
    return SP(temperature=rng.choice([0.0, 0.3, 0.7, 1.0, 1.5]),
              top_k=rng.choice([-1, -1, 1, 2, 5, vocab // 2, vocab + 5]),
              top_p=rng.choice([1.0, 1.0, 0.9, 0.5, 0.1]),
              min_p=rng.choice([0.0, 0.0, 0.05, 0.3]),
              repetition_penalty=rng.choice([1.0, 1.0, 1.3, 0.8]),
              frequency_penalty=rng.choice([0.0, 0.0, 0.5, -0.3]),
              presence_penalty=rng.choice([0.0, 0.0, 0.7]),
              logprobs=rng.choice([None, None, 0, 3]))


def _random_rows(rng: random.Random, n: int, vocab: int) -> list[SampleRow]:
    return [_row(_random_params(rng, vocab), seed=rng.getrandbits(64), index=rng.randrange(100),
                 prompt=[rng.randrange(vocab) for _ in range(rng.randrange(1, 12))],
                 output=[rng.randrange(vocab) for _ in range(rng.randrange(0, 12))]) for _ in range(n)]


@pytest.mark.parametrize("vocab", [7, 50, 300])
def test_matches_reference_random_knobs(vocab):
    rng = random.Random(vocab)
    torch.manual_seed(vocab)
    sampler = Sampler(vocab)
    mismatches, total = 0, 0
    for _ in range(20):
        rows = _random_rows(rng, 16, vocab)
        logits = torch.randn(16, vocab) * 3
        got = sampler(logits, rows).token_ids
        want = [reference_token(logits[i], r) for i, r in enumerate(rows)]
        mismatches += sum(g != w for g, w in zip(got, want))
        total += len(rows)
    assert mismatches <= total // 200, f"{mismatches}/{total} rows differ from the reference"


@pytest.mark.parametrize("knob", [dict(temperature=0.8), dict(top_k=3), dict(top_p=0.6), dict(min_p=0.2),
                                  dict(top_k=4, top_p=0.7, min_p=0.1, temperature=1.3)])
def test_each_knob_matches_reference_exactly(knob):
    vocab, sampler = 40, Sampler(40)
    torch.manual_seed(1)
    logits = torch.randn(64, vocab) * 2
    rows = [_row(SP(**knob), seed=1000 + i, index=i % 5) for i in range(64)]
    assert sampler(logits, rows).token_ids == [reference_token(logits[i], r) for i, r in enumerate(rows)]


def test_seeded_rows_identical_alone_and_in_shuffled_batches():
    vocab = 120
    rng = random.Random(7)
    torch.manual_seed(7)
    sampler = Sampler(vocab)
    rows = _random_rows(rng, 40, vocab)
    logits = torch.randn(40, vocab) * 2
    alone = [sampler(logits[i:i + 1], [r]).token_ids[0] for i, r in enumerate(rows)]
    for trial in range(5):
        order = list(range(40))
        rng.shuffle(order)
        sub = order[: rng.randrange(2, 41)]
        got = sampler(logits[sub], [rows[i] for i in sub]).token_ids
        assert got == [alone[i] for i in sub], f"trial {trial}"
    # Rows whose batch-mates all use top-k take the top-k candidate path; results must not change.
    topk = [i for i, r in enumerate(rows) if 1 < r.params.top_k < vocab and r.params.temperature > 0]
    assert len(topk) >= 2
    assert sampler(logits[topk], [rows[i] for i in topk]).token_ids == [alone[i] for i in topk]


def test_seed_and_position_change_the_choice():
    sampler, logits = Sampler(1000), torch.zeros(1, 1000)  # uniform: any token equally likely
    by_seed = {sampler(logits, [_row(SP(), seed=s)]).token_ids[0] for s in range(50)}
    by_pos = {sampler(logits, [_row(SP(), seed=1, index=i)]).token_ids[0] for i in range(50)}
    assert len(by_seed) > 40 and len(by_pos) > 40
    assert sampler(logits, [_row(SP(), seed=99, index=3)]).token_ids == \
        sampler(logits, [_row(SP(), seed=99, index=3)]).token_ids


def _frequencies(sampler, logits_row, rows):
    toks = sampler(logits_row.expand(len(rows), -1), rows).token_ids
    return torch.bincount(torch.tensor(toks), minlength=logits_row.shape[0]).double() / len(rows)


def test_empirical_distribution_matches_softmax():
    vocab, n = 8, 20000
    sampler = Sampler(vocab)
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2])
    expect = (logits / 0.7).softmax(-1).double()
    by_seed = _frequencies(sampler, logits, [_row(SP(temperature=0.7), seed=s, index=5) for s in range(n)])
    by_step = _frequencies(sampler, logits, [_row(SP(temperature=0.7), seed=42, index=i) for i in range(n)])
    assert (by_seed - expect).abs().max() < 0.015
    assert (by_step - expect).abs().max() < 0.015
    # top-k 3 + top-p: the renormalized surviving mass
    rows = [_row(SP(top_k=3, top_p=0.8), seed=s) for s in range(n)]
    got = _frequencies(sampler, logits, rows)
    keep = torch.zeros(vocab, dtype=torch.bool)
    keep[[0, 6]] = True  # top-3 = {0, 6, 1}; p(0)+p(6) of the top-3 renormalized is >= 0.8 -> drop 1
    top3 = logits.clone()
    top3[[2, 3, 4, 5, 7]] = -math.inf
    assert top3.softmax(-1)[[0, 6]].sum() >= 0.8 > top3.softmax(-1)[0]
    want = logits.masked_fill(~keep, -math.inf).softmax(-1).double()
    assert (got - want).abs().max() < 0.015


def test_noise_is_uniform_and_in_range():
    keys = torch.tensor([row_keys(s, i) for s in range(4) for i in range(4)])
    ids = torch.arange(4096)
    g = gumbel_noise(ids, keys)
    assert torch.isfinite(g).all()
    u = torch.exp(-torch.exp(-g.double())).flatten()  # back to the uniform
    hist = torch.histc(u, bins=16, min=0, max=1) / u.numel()
    assert (hist - 1 / 16).abs().max() < 0.005
    # extreme ids / keys stay within 32 bits (no int64 overflow)
    big = gumbel_noise(torch.tensor([0, 2 ** 32 - 1]), torch.tensor([[2 ** 32 - 1, 2 ** 32 - 1]]))
    assert torch.isfinite(big).all()
    assert row_keys(-1, 0) == row_keys(2 ** 64 - 1, 0) and row_keys(1, 0) != row_keys(1 + 2 ** 32, 0)


def test_greedy_equivalents():
    torch.manual_seed(3)
    vocab = 500
    sampler, logits = Sampler(vocab), torch.randn(32, vocab)
    argmax = logits.argmax(-1).tolist()
    assert sampler(logits, [_row(SP(temperature=0.0)) for _ in range(32)]).token_ids == argmax
    assert sampler(logits, [_row(SP(top_k=1), seed=i) for i in range(32)]).token_ids == argmax
    assert sampler(logits, [_row(SP(top_p=1e-6), seed=i) for i in range(32)]).token_ids == argmax
    assert sampler(logits, [_row(SP(min_p=1.0), seed=i) for i in range(32)]).token_ids == argmax
    bf16 = logits.bfloat16()
    assert sampler(bf16, [_row(SP(temperature=0.0)) for _ in range(32)]).token_ids == \
        bf16.float().argmax(-1).tolist()


def test_min_p_excludes_unlikely_tokens():
    sampler = Sampler(6)
    logits = torch.tensor([3.0, 2.9, 2.0, 0.0, -1.0, 2.5])
    probs = logits.softmax(-1)
    allowed = set((probs >= 0.3 * probs.max()).nonzero().flatten().tolist())
    assert allowed == {0, 1, 2, 5}
    seen = set(_frequencies(sampler, logits, [_row(SP(min_p=0.3), seed=s) for s in range(3000)])
               .nonzero().flatten().tolist())
    assert seen == allowed


def test_penalties_shift_greedy_choice():
    sampler = Sampler(5)
    logits = torch.tensor([[2.0, 1.9, -1.0, -1.2, 0.5]])
    greedy = dict(temperature=0.0)
    assert sampler(logits, [_row(SP(**greedy))]).token_ids == [0]
    # repetition penalty divides the positive logit of a token seen in the prompt
    assert sampler(logits, [_row(SP(repetition_penalty=1.2, **greedy), prompt=[0])]).token_ids == [1]
    # ... and multiplies negative ones (makes them more negative)
    neg = torch.tensor([[-1.0, -1.1, -3.0, -3.0, -3.0]])
    assert sampler(neg, [_row(SP(repetition_penalty=1.2, **greedy), output=[0])]).token_ids == [1]
    # frequency penalty scales with the count, presence penalty does not; prompt tokens do not count
    rows = [_row(SP(frequency_penalty=0.06, **greedy), output=[0]),
            _row(SP(frequency_penalty=0.06, **greedy), output=[0, 0]),
            _row(SP(presence_penalty=0.2, **greedy), output=[0, 0, 0]),
            _row(SP(presence_penalty=0.2, **greedy), prompt=[0])]
    assert sampler(logits.expand(4, -1), rows).token_ids == [0, 1, 1, 0]


def test_logprobs_are_raw_log_softmax():
    torch.manual_seed(5)
    vocab = 64
    sampler, logits = Sampler(vocab), torch.randn(4, vocab) * 2
    rows = [_row(SP(temperature=0.0, logprobs=5)),
            _row(SP(temperature=0.5, logprobs=0, repetition_penalty=2.0), seed=3, prompt=[1, 2, 3]),
            _row(SP(temperature=1.0), seed=4),
            _row(SP(temperature=2.0, top_k=3, logprobs=2), seed=9)]
    res = sampler(logits, rows)
    raw = torch.log_softmax(logits.double(), -1)
    assert res.logprobs[2] is None
    for i in (0, 1, 3):
        lp = res.logprobs[i]
        assert lp.token_id == res.token_ids[i]
        assert lp.logprob == pytest.approx(raw[i, lp.token_id].item(), abs=1e-5)
        k = rows[i].params.logprobs
        want = torch.topk(raw[i], k) if k else None
        assert [t for t, _ in lp.top] == (want.indices.tolist() if k else [])
        for (_, got), exp in zip(lp.top, want.values.tolist() if k else []):
            assert got == pytest.approx(exp, abs=1e-5)
    assert res.logprobs[0].top[0][0] == res.token_ids[0]


def test_padded_vocab_never_sampled_and_logits_untouched():
    sampler = Sampler(10)
    logits = torch.zeros(3, 16)
    logits[:, 12] = 100.0  # padding column
    before = logits.clone()
    rows = [_row(SP(temperature=0.0)), _row(SP(repetition_penalty=1.5), seed=1, prompt=[3]),
            _row(SP(top_p=0.5, logprobs=2), seed=2)]
    res = sampler(logits, rows)
    assert all(t < 10 for t in res.token_ids)
    assert torch.equal(logits, before)
    assert sampler(logits[:1], rows[:1]).token_ids[0] < 10


def test_penalty_cache_follows_growing_lists():
    sampler, vocab = Sampler(8), 8
    logits = torch.tensor([[1.0, 0.9, 0.8, 0.7, 0.0, 0.0, 0.0, 0.0]])
    out: list[int] = []
    row = _row(SP(temperature=0.0, presence_penalty=1.0))
    row.output_ids = out  # the engine appends to the same list between steps
    for _ in range(4):
        out.append(sampler(logits, [row]).token_ids[0])
    assert out == [0, 1, 2, 3]
    assert len(sampler._cache) == 1


def test_device_tokens_match_reference_for_host_free_rows():
    """device_tokens (no host sync; what decode steps launched ahead use) picks the reference's token for every
    row without penalties or logprobs: greedy, seeded random and mixed batches, padded vocabulary."""
    vocab, rng = 60, random.Random(3)
    sampler = Sampler(vocab)
    torch.manual_seed(3)
    for greedy_only in (True, False, False, False):
        rows = []
        for _ in range(12):
            p = _random_params(rng, vocab)
            p.repetition_penalty, p.frequency_penalty, p.presence_penalty, p.logprobs = 1.0, 0.0, 0.0, None
            if greedy_only:
                p.temperature = 0.0
            rows.append(_row(p, seed=rng.getrandbits(64), index=rng.randrange(50)))
        assert all(Sampler.host_free(r.params) for r in rows)
        logits = torch.randn(12, vocab + 4) * 3  # 4 padded columns, never sampled
        logits[:, vocab:] = 100.0
        got = sampler.device_tokens(logits, rows)
        assert got.dtype == torch.int64 and got.shape == (12,)
        assert got.tolist() == [reference_token(logits[i, :vocab], r) for i, r in enumerate(rows)]
        assert got.tolist() == sampler(logits, rows).token_ids
