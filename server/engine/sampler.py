"""Vectorized sampler: penalties, temperature, top-k/top-p/min-p, seeded Gumbel-max sampling, logprobs."""
from __future__ import annotations

import math
from array import array
from dataclasses import dataclass

import torch

from loramux.kernels.backend import env_mode
from loramux.server.engine.noise import gumbel_noise, row_keys
from loramux.server.engine.request import SamplingParams, TokenLogprob

_EPS = 1e-5  # temperatures below this are greedy (as in vLLM)
FUSED_SAMPLING_ENV = "LORAMUX_FUSED_SAMPLING"


@dataclass(slots=True)
class SampleRow:
    """One sequence in the step."""

    params: SamplingParams
    seed: int  # the engine always provides one (drawn if the user gave none)
    output_index: int  # index of the token being sampled among the outputs (0 for the first)
    prompt_ids: list[int]
    output_ids: list[int]


@dataclass(slots=True)
class SampleResult:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]  # None for rows that asked for none


def _fused_argmax(x: torch.Tensor, meta: torch.Tensor, thr: torch.Tensor) -> torch.Tensor:
    """Gumbel-max over each row's tokens with x / temperature >= thr [B, 1] in one Triton pass (imported lazily:
    CPU installs without Triton never load it)."""
    from loramux.kernels.sampling_triton import gumbel_argmax
    return gumbel_argmax(x.contiguous(), meta, thr.squeeze(1))


def _valid(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    return ids[(ids >= 0) & (ids < vocab)]


class Sampler:
    """Picks one token per row from logits [B, V]; rows are independent of each other.

    Per-row settings reach the device in one copy per call (plus one for penalties): each
    torch.tensor(list, device="cuda") is a blocking copy that waits for the queued forward pass.
    """

    def __init__(self, vocab_size: int, fused: str | None = None) -> None:
        self.vocab_size = vocab_size  # logits columns beyond this (padded lm_head) are never sampled
        # Random rows: noise + bounds + argmax in one Triton pass (kernels/sampling_triton.py); top-k / top-p bounds
        # still come from torch's topk / sort. "auto" (default) = on CUDA, "on" = also on CPU (TRITON_INTERPRET=1
        # tests), "off" = torch only.
        self.fused = fused or env_mode(FUSED_SAMPLING_ENV)
        self._arange: dict[torch.device, torch.Tensor] = {}
        self._cache: dict[int, tuple[list[int], int, torch.Tensor]] = {}  # id(list) -> (list, len, CPU ids)

    @staticmethod
    def plain_greedy(p: SamplingParams) -> bool:
        """Whether a row takes the fast path of __call__: argmax, no penalty, no logprobs."""
        return (p.temperature < _EPS or p.top_k == 1) and Sampler.host_free(p)

    @staticmethod
    def host_free(p: SamplingParams) -> bool:
        """Whether a row's token needs nothing from the host but its params, seed and position (no penalty, no
        logprobs): device_tokens can pick it, and a next step can be fed from it before the host reads it."""
        return p.logprobs is None and not Sampler.penalized(p)

    @staticmethod
    def penalized(p: SamplingParams) -> bool:
        return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0

    def fused_on(self, cuda: bool) -> bool:
        """Whether random rows go through the fused kernel on a CUDA (or CPU) device."""
        return self.fused == "on" or (self.fused == "auto" and cuda)

    def device_tokens(self, logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
        """Tokens [B] int64 left on the device, no host sync (per-row settings travel in a pinned, non-blocking
        copy); rows must all be host_free. The same tokens as __call__ for the same rows."""
        if logits.shape[1] > self.vocab_size:
            logits = logits[:, :self.vocab_size]
        if self._cache:
            self._cache = {}
        if all(self.plain_greedy(r.params) for r in rows):
            return logits.argmax(-1)
        return self._pick(logits.float(), rows, [r.params for r in rows], pinned=logits.is_cuda)

    def __call__(self, logits: torch.Tensor, rows: list[SampleRow]) -> SampleResult:
        if logits.shape[0] != len(rows):
            raise ValueError(f"logits has {logits.shape[0]} rows but {len(rows)} sample rows were given")
        if logits.shape[1] > self.vocab_size:
            logits = logits[:, :self.vocab_size]
        params = [r.params for r in rows]
        if all(self.plain_greedy(p) for p in params):  # fast path: all greedy, nothing else
            if self._cache:  # no penalty rows: nothing to keep
                self._cache = {}
            return SampleResult(logits.argmax(-1).tolist(), [None] * len(rows))
        pen = [i for i, p in enumerate(params) if self.penalized(p)]
        lp_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        if not pen and self._cache:
            self._cache = {}
        x = self._penalize(logits.float(), rows, pen) if pen else logits.float()
        tokens = self._pick(x, rows, params)
        if not lp_rows:
            return SampleResult(tokens.tolist(), [None] * len(rows))
        return self._with_logprobs(logits, tokens, params, lp_rows)

    def _pick(self, x: torch.Tensor, rows: list[SampleRow], params: list[SamplingParams],
              pinned: bool = False) -> torch.Tensor:
        """Tokens [B] on the device from (penalized) fp32 logits: argmax for greedy rows, _sample for the rest."""
        rand = [i for i, p in enumerate(params) if p.temperature >= _EPS and p.top_k != 1]
        if not rand:
            return x.argmax(-1)
        vocab = x.shape[1]
        # One copy: row index, temperature, top_p, min_p, top_k, noise keys (all exact in float64). From pageable
        # memory it waits for the queued forward; a pinned non-blocking copy does not.
        meta = torch.tensor([(i, params[i].temperature, params[i].top_p, params[i].min_p,
                              params[i].top_k if 0 < params[i].top_k < vocab else 0,
                              *row_keys(rows[i].seed, rows[i].output_index)) for i in rand], dtype=torch.float64)
        meta = meta.pin_memory().to(x.device, non_blocking=True) if pinned else meta.to(x.device)
        if len(rand) == len(rows):
            return self._sample(x, [params[i] for i in rand], meta)
        idx = meta[:, 0].long()
        tokens = x.argmax(-1)
        tokens[idx] = self._sample(x[idx], [params[i] for i in rand], meta)
        return tokens

    def _penalize(self, x: torch.Tensor, rows: list[SampleRow], idx: list[int]) -> torch.Tensor:
        """vLLM order: repetition penalty (prompt + output tokens), then frequency and presence (output).

        Dense [rows, V] masks/counts built on the device (no unique, no sync); the token ids come from a
        per-list CPU cache and travel with the per-row penalties in one copy.
        """
        live: dict[int, tuple[list[int], int, torch.Tensor]] = {}
        n, vocab, dev = len(idx), x.shape[1], x.device
        rep = [j for j, i in enumerate(idx) if rows[i].params.repetition_penalty != 1.0]
        fp = [j for j, i in enumerate(idx) if rows[i].params.frequency_penalty != 0.0
              or rows[i].params.presence_penalty != 0.0]
        seqs = [rows[idx[j]].prompt_ids for j in rep] + [rows[idx[j]].output_ids for j in rep] + \
            [rows[idx[j]].output_ids for j in fp]
        ids = [self._ids_cpu(s, vocab, live) for s in seqs]
        self._cache = live  # entries of lists not seen in this step are dropped
        lens = [len(t) for t in ids]
        n_rep, m = sum(lens[:2 * len(rep)]), sum(lens)
        own = torch.repeat_interleave(torch.tensor(rep + rep + fp), torch.tensor(lens))
        head = torch.tensor([[i, rows[i].params.repetition_penalty, rows[i].params.frequency_penalty,
                              rows[i].params.presence_penalty] for i in idx], dtype=torch.float64)
        # One copy: the float64 head travels bit-cast inside the int64 buffer.
        packed = torch.cat([head.view(torch.int64).flatten(), own, *ids]).to(dev)
        head = packed[:4 * n].view(torch.float64).view(n, 4)
        own, tok = packed[4 * n:4 * n + m], packed[4 * n + m:]
        rows_t = head[:, 0].long()
        xs = x if n == x.shape[0] else x[rows_t]
        if n_rep:
            seen = torch.zeros(n, vocab, dtype=torch.bool, device=dev)
            seen[own[:n_rep], tok[:n_rep]] = True
            rp = head[:, 1:2].float()
            xs = torch.where(seen, torch.where(xs > 0, xs / rp, xs * rp), xs)
        if n_rep < m:
            counts = torch.zeros(n, vocab, device=dev).index_put_(
                (own[n_rep:], tok[n_rep:]), torch.ones(m - n_rep, device=dev), accumulate=True)
            xs = xs - head[:, 2:3].float() * counts - head[:, 3:4].float() * (counts > 0)
        if n == x.shape[0]:
            return xs
        x = x.clone()
        x[rows_t] = xs
        return x

    def _ids_cpu(self, ids: list[int], vocab: int, live: dict) -> torch.Tensor:
        """The valid ids of a list as a CPU tensor, cached per list object (engine lists only grow)."""
        hit = self._cache.get(id(ids)) or live.get(id(ids))
        n = len(ids)
        if hit is not None and hit[0] is ids and hit[1] <= n:
            t = hit[2] if hit[1] == n else torch.cat([hit[2], _valid(torch.tensor(ids[hit[1]:]), vocab)])
        elif n:  # array('q') + frombuffer is ~20x faster than torch.tensor() on a long list
            t = _valid(torch.frombuffer(array("q", ids), dtype=torch.int64).clone(), vocab)
        else:
            t = torch.empty(0, dtype=torch.int64)
        live[id(ids)] = (ids, n, t)
        return t

    def _sample(self, x: torch.Tensor, params: list[SamplingParams], meta: torch.Tensor) -> torch.Tensor:
        """Temperature, top-k, top-p, min-p, then Gumbel-max with per-(seed, position) noise."""
        vocab = x.shape[1]
        ks = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
        kmax = max(ks)
        use_p = any(p.top_p < 1.0 for p in params)
        fused = self.fused_on(x.is_cuda)
        if fused and not kmax and not use_p:  # the kernel divides by the temperature itself: one pass in all
            thr = torch.full((x.shape[0], 1), -math.inf, device=x.device)
            if any(p.min_p > 0.0 for p in params):  # max(x) / t == max(x / t): rounding is monotonic
                thr = self._min_p_threshold(x.amax(-1, keepdim=True) / meta[:, 1:2].float(), meta)
            return _fused_argmax(x, meta, thr)
        x = x / meta[:, 1:2].float()
        ids = None
        if kmax and all(ks):  # every row has top-k: only the kmax best candidates can be chosen
            vals, ids = x.topk(kmax, dim=-1)
        elif use_p:
            vals, ids = x.sort(dim=-1, descending=True, stable=True)
        else:
            vals = x
        srt = ids is not None
        thr = None
        if kmax:
            kt = meta[:, 4:5].long()
            kvals = vals if srt else x.topk(kmax, dim=-1).values
            thr = kvals.gather(1, (kt - 1).clamp_(min=0)).masked_fill_(kt == 0, -math.inf)
        if use_p:  # keep the smallest prefix (best first) whose probability mass reaches top_p
            ps = meta[:, 2:3].float()
            probs = (vals if thr is None else vals.masked_fill(vals < thr, -math.inf)).softmax(-1)
            keep = ((probs.cumsum(-1) - probs) < ps) | (ps >= 1.0)
            pthr = vals.gather(1, keep.sum(-1, keepdim=True).clamp_(min=1) - 1)
            thr = pthr if thr is None else torch.maximum(thr, pthr)
        if any(p.min_p > 0.0 for p in params):  # p >= min_p * p_max  <=>  logit >= max_logit + log(min_p)
            mthr = self._min_p_threshold(vals[:, :1] if srt else x.amax(-1, keepdim=True), meta)
            thr = mthr if thr is None else torch.maximum(thr, mthr)
        if fused and not (kmax and all(ks)):  # thresholds from the sort / top-k above; noise + argmax fused over the
            unit = meta.clone()  # whole row (x is already divided by the temperature: exact bounds, no 2nd divide)
            unit[:, 1] = 1.0
            return _fused_argmax(x, unit, thr)
        if thr is not None:
            vals = vals.masked_fill(vals < thr, -math.inf)
        noise = gumbel_noise(ids if srt else self._arange_on(vocab, x.device), meta[:, 5:7].long())
        choice = (vals + noise).argmax(-1)
        return ids.gather(1, choice.unsqueeze(1)).squeeze(1) if srt else choice

    @staticmethod
    def _min_p_threshold(top: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        """[B, 1] lowest kept logit after temperature: p >= min_p * p_max  <=>  x >= max(x) + log(min_p)."""
        mins = meta[:, 3:4].float()
        return torch.where(mins > 0, top + mins.clamp(min=1e-30).log(), -math.inf)

    def _arange_on(self, vocab: int, dev: torch.device) -> torch.Tensor:
        a = self._arange.get(dev)
        if a is None or a.numel() != vocab:
            a = self._arange[dev] = torch.arange(vocab, dtype=torch.int64, device=dev)
        return a

    @staticmethod
    def _with_logprobs(logits: torch.Tensor, tokens: torch.Tensor, params: list[SamplingParams],
                       lp_rows: list[int]) -> SampleResult:
        """Raw model logprobs (before penalties and temperature) of the chosen token + the top alternatives."""
        if len(lp_rows) < len(params):
            li = torch.tensor(lp_rows).to(logits.device)
            logits, chosen = logits[li], tokens[li]
        else:
            chosen = tokens
        raw = torch.log_softmax(logits.float(), dim=-1)
        kmax = min(max(params[i].logprobs for i in lp_rows), raw.shape[1])
        top_v, top_i = raw.topk(kmax, dim=-1)
        vals = torch.cat([raw.gather(1, chosen.unsqueeze(1)), top_v], dim=1)
        token_ids = tokens.tolist()  # the sync; the copies below are then immediate
        vals, top_i = vals.tolist(), top_i.tolist()
        out: list[TokenLogprob | None] = [None] * len(params)
        for j, i in enumerate(lp_rows):
            k = params[i].logprobs
            out[i] = TokenLogprob(token_ids[i], vals[j][0], list(zip(top_i[j][:k], vals[j][1:k + 1])))
        return SampleResult(token_ids, out)
