"""Workload generation: request lengths, random-word prompts, adapter mix and arrival times."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Common English words that BPE tokenizers (Llama, Mistral, Qwen, GPT) encode as one token each when
# preceded by a space, so a prompt of N words is roughly N tokens. A byte-level tokenizer counts more.
WORDS = tuple(
    """the of and to in is you that it he was for on are as with his they at be this have from or one
    had by word but not what all were we when your can said there use an each which she do how their if
    will up other about out many then them these so some her would make like him into time has look two
    more write go see number no way could people my than first water been call who oil its now find long
    down day did get come made may part over new sound take only little work know place year live me back
    give most very after thing our just name good sentence man think say great where help through much
    before line right too mean old any same tell boy follow came want show also around form three small
    set put end does another well large must big even such because turn here why ask went men read need
    land different home us move try kind hand picture again change off play spell air away animal house
    point page letter mother answer found study still learn should world high every near add food between
    own below country plant last school father keep tree never start city earth eye light thought head
    under story saw left few while along might close something seem next hard open example begin life
    always those both paper together got group often run important until children side feet car mile""".split()
)

# Synthetic ShareGPT-like lengths: lognormal (median tokens, sigma). After clipping the means come out
# near 185 input and 195 output tokens with long right tails, roughly the shape of ShareGPT V3 conversations
# after the usual filter (4 <= len, input <= 1024, input + output <= 2048). Generated locally.
SHAREGPT_INPUT = (110.0, 1.1)
SHAREGPT_OUTPUT = (130.0, 0.9)
SHAREGPT_MAX_INPUT, SHAREGPT_MAX_TOTAL, MIN_LEN = 1024, 2048, 4


@dataclass
class RequestSpec:
    """One planned request."""

    index: int
    arrival: float  # seconds after the run starts at which it is released (before the concurrency cap)
    model: str  # the `model` field sent: an adapter id, or the base model's name
    adapter: str | None  # None = base model
    prompt: str
    input_len: int  # words in the prompt (roughly tokens)
    output_len: int  # max_tokens


def parse_adapter_dist(text: str) -> tuple[str, float]:
    """'uniform' | 'single' | 'zipf' | 'zipf:ALPHA' -> (kind, alpha)."""
    kind, _, arg = text.strip().lower().partition(":")
    if kind in ("uniform", "single") and not arg:
        return kind, 0.0
    if kind == "zipf":
        try:
            alpha = float(arg) if arg else 1.0
        except ValueError:
            raise ValueError(f"bad zipf exponent in {text!r}") from None
        if alpha < 0:
            raise ValueError("zipf exponent must be >= 0")
        return kind, alpha
    raise ValueError(f"adapter distribution must be uniform, single or zipf:ALPHA, not {text!r}")


def adapter_probs(n: int, kind: str, alpha: float = 1.0) -> np.ndarray:
    """Probability of each of n adapters; with zipf the i-th adapter (0-based) gets weight 1/(i+1)^alpha."""
    if n <= 0:
        return np.zeros(0)
    if kind == "single":
        p = np.zeros(n)
        p[0] = 1.0
        return p
    if kind == "uniform":
        return np.full(n, 1.0 / n)
    if kind == "zipf":
        w = np.arange(1, n + 1, dtype=np.float64) ** -alpha
        return w / w.sum()
    raise ValueError(f"unknown adapter distribution {kind!r}")


def sample_lengths(
    rng: np.random.Generator,
    n: int,
    dist: str,
    input_len: int | None,
    output_len: int | None,
    range_ratio: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Input and output lengths for n requests: 'fixed' (optionally +-range_ratio uniform) or 'sharegpt'."""
    if dist == "fixed":
        lens = []
        for base in (input_len or 128, output_len or 128):
            lo = max(1, int(round(base * (1 - range_ratio))))
            hi = max(lo, int(round(base * (1 + range_ratio))))
            lens.append(rng.integers(lo, hi + 1, size=n))
        return lens[0], lens[1]
    if dist == "sharegpt":
        med_in = input_len or SHAREGPT_INPUT[0]
        med_out = output_len or SHAREGPT_OUTPUT[0]
        inp = rng.lognormal(np.log(med_in), SHAREGPT_INPUT[1], size=n)
        out = rng.lognormal(np.log(med_out), SHAREGPT_OUTPUT[1], size=n)
        inp = np.clip(np.round(inp), MIN_LEN, SHAREGPT_MAX_INPUT).astype(np.int64)
        out = np.clip(np.round(out), MIN_LEN, SHAREGPT_MAX_TOTAL - inp).astype(np.int64)
        return inp, out
    raise ValueError(f"length distribution must be fixed or sharegpt, not {dist!r}")


def arrival_times(rng: np.random.Generator, n: int, rate: float, burstiness: float = 1.0) -> np.ndarray:
    """Release times in seconds: all 0 for rate=inf, else a gamma process (Poisson when burstiness=1)."""
    if n == 0 or np.isinf(rate):
        return np.zeros(n)
    if rate <= 0 or burstiness <= 0:
        raise ValueError("request rate and burstiness must be > 0")
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)
    gaps[0] = 0.0  # the first request goes at once, as in vllm bench
    return np.cumsum(gaps)


def make_prompt(rng: np.random.Generator, n_words: int) -> str:
    """n_words random common words joined by spaces."""
    idx = rng.integers(0, len(WORDS), size=max(1, int(n_words)))
    return " ".join(WORDS[i] for i in idx)


def build_workload(
    num_requests: int,
    *,
    seed: int,
    base_model: str,
    adapters: list[str],
    adapter_dist: str = "uniform",
    base_fraction: float = 0.0,
    length_dist: str = "fixed",
    input_len: int | None = None,
    output_len: int | None = None,
    range_ratio: float = 0.0,
    request_rate: float = float("inf"),
    burstiness: float = 1.0,
) -> list[RequestSpec]:
    """The full request plan; the same arguments always give the same plan."""
    if not 0.0 <= base_fraction <= 1.0:
        raise ValueError("base fraction must be in [0, 1]")
    r_len, r_prompt, r_adapter, r_arrival = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4)
    )
    inp, out = sample_lengths(r_len, num_requests, length_dist, input_len, output_len, range_ratio)
    arrivals = arrival_times(r_arrival, num_requests, request_rate, burstiness)
    kind, alpha = parse_adapter_dist(adapter_dist)
    probs = adapter_probs(len(adapters), kind, alpha)
    use_base = r_adapter.random(num_requests) < base_fraction
    picks = r_adapter.choice(len(adapters), size=num_requests, p=probs) if adapters else None
    specs = []
    for i in range(num_requests):
        adapter = None if picks is None or use_base[i] else adapters[int(picks[i])]
        specs.append(
            RequestSpec(
                index=i,
                arrival=float(arrivals[i]),
                model=adapter or base_model,
                adapter=adapter,
                prompt=make_prompt(r_prompt, int(inp[i])),
                input_len=int(inp[i]),
                output_len=int(out[i]),
            )
        )
    return specs
