"""Unit tests of loadtest/: workload distributions, percentiles, goodput, safetensors writer, compare."""

from __future__ import annotations

import numpy as np
import pytest

from loramux.loadtest.client import RequestRecord
from loramux.loadtest.metrics import meets_slo, parse_goodput, stats_ms, summarize
from loramux.loadtest.report import compare, format_table
from loramux.loadtest.safetensors_io import BF16Array, save_file, serialize
from loramux.loadtest.workload import adapter_probs, arrival_times, build_workload, parse_adapter_dist

ADS = [f"a{i}" for i in range(5)]


def counts(specs):
    return [sum(s.adapter == a for s in specs) for a in ADS]


def test_zipf_is_skewed_and_matches_its_probabilities():
    specs = build_workload(4000, seed=1, base_model="b", adapters=ADS, adapter_dist="zipf:1.2")
    c = counts(specs)
    p = adapter_probs(5, "zipf", 1.2)
    assert c == sorted(c, reverse=True) and c[0] > 3 * c[4]
    assert np.allclose(np.array(c) / 4000, p, atol=0.03)
    uni = counts(build_workload(4000, seed=1, base_model="b", adapters=ADS, adapter_dist="uniform"))
    assert max(uni) - min(uni) < 200
    assert np.allclose(adapter_probs(5, "zipf", 0.0), 0.2)


def test_single_and_base_fraction():
    specs = build_workload(2000, seed=2, base_model="b", adapters=ADS, adapter_dist="single", base_fraction=0.3)
    base = [s for s in specs if s.adapter is None]
    assert {s.adapter for s in specs} == {"a0", None} and all(s.model == "b" for s in base)
    assert abs(len(base) / 2000 - 0.3) < 0.04
    none = build_workload(10, seed=2, base_model="b", adapters=[], base_fraction=0.0)
    assert all(s.adapter is None and s.model == "b" for s in none)


def test_plan_is_seeded_and_lengths_follow_the_distribution():
    kw = dict(base_model="b", adapters=ADS, adapter_dist="zipf:1", length_dist="sharegpt")
    a, b = build_workload(500, seed=3, **kw), build_workload(500, seed=3, **kw)
    assert [(s.prompt, s.model, s.output_len) for s in a] == [(s.prompt, s.model, s.output_len) for s in b]
    assert a[0].prompt != build_workload(1, seed=4, **kw)[0].prompt
    inp = np.array([s.input_len for s in a])
    out = np.array([s.output_len for s in a])
    assert inp.min() >= 4 and inp.max() <= 1024 and (inp + out).max() <= 2048
    assert 80 < np.median(inp) < 150 and 100 < np.median(out) < 170 and inp.std() > 50
    assert all(len(s.prompt.split()) == s.input_len for s in a)
    fixed = build_workload(50, seed=3, base_model="b", adapters=[], input_len=100, output_len=10, range_ratio=0.2)
    assert all(80 <= s.input_len <= 120 and 8 <= s.output_len <= 12 for s in fixed)


def test_arrivals_and_bad_distribution_names():
    rng = np.random.default_rng(0)
    assert not arrival_times(rng, 5, float("inf")).any()
    t = arrival_times(rng, 4000, 10.0)
    assert t[0] == 0 and np.all(np.diff(t) >= 0) and abs(np.diff(t).mean() - 0.1) < 0.01
    assert parse_adapter_dist("zipf") == ("zipf", 1.0) and parse_adapter_dist("ZIPF:0.5") == ("zipf", 0.5)
    for bad in ("zipf:x", "pareto", "zipf:-1", "uniform:2"):
        with pytest.raises(ValueError):
            parse_adapter_dist(bad)


def test_stats_and_percentiles():
    s = stats_ms([0.001 * i for i in range(1, 101)])
    assert s["mean"] == pytest.approx(50.5) and s["median"] == pytest.approx(50.5)
    assert s["p90"] == pytest.approx(90.1) and s["p99"] == pytest.approx(99.01) and s["max"] == pytest.approx(100)
    assert stats_ms([])["p99"] == 0.0 and stats_ms([], [99.9])["p99.9"] == 0.0


def rec(i, ttft, e2el, out, status=200, adapter="x"):
    r = RequestRecord(i, adapter or "b", adapter, 10, out, start=0.0, status=status, success=status == 200)
    if r.success:
        r.ttft, r.e2el, r.output_tokens, r.prompt_tokens = ttft, e2el, out, 10
        r.itl = [(e2el - ttft) / max(out - 1, 1)] * (out - 1)
    return r


def test_goodput_and_summary():
    assert parse_goodput(["ttft:500", "TPOT:50"]) == {"ttft": 500.0, "tpot": 50.0}
    for bad in (["ttft"], ["foo:3"], ["e2el:-1"], ["ttft:abc"]):
        with pytest.raises(ValueError):
            parse_goodput(bad)
    fast, slow_ttft, slow_tpot = rec(0, 0.1, 0.5, 5), rec(1, 0.6, 0.7, 5), rec(2, 0.1, 2.1, 5)  # tpot .1/.1/.5
    slo = {"ttft": 500.0, "tpot": 200.0}
    assert meets_slo(fast, slo) and not meets_slo(slow_ttft, slo) and not meets_slo(slow_tpot, slo)
    assert meets_slo(rec(3, 0.1, 0.1, 1), slo)  # one token: TPOT counts as 0
    recs = [fast, slow_ttft, slow_tpot, rec(4, 0, 0, 0, status=429), rec(5, 0, 0, 0, status="ReadTimeout")]
    recs.append(RequestRecord(6, "b", None, 10, 5))  # never sent
    s = summarize(recs, 2.0, slo=slo)
    assert s["completed"] == 3 and s["failed"] == 2 and s["not_sent"] == 1
    assert s["failed_by_status"] == {"429": 1, "ReadTimeout": 1}
    assert s["goodput"]["good_requests"] == 1 and s["goodput"]["request_goodput"] == 0.5
    assert s["total_output_tokens"] == 15 and s["output_throughput"] == 7.5
    assert s["tpot"]["median"] == pytest.approx(100.0) and s["itl"]["count"] == 12
    table = format_table(s)
    assert "status 429:" in table and "P99 TPOT (ms):" in table and "Request goodput (req/s):" in table
    b = summarize([rec(0, 0.05, 0.25, 5)], 1.0)
    text = compare({"summary": s}, {"summary": b}, ("lmx", "vllm"))
    assert "lmx" in text and "Mean TTFT (ms)" in text and "0.50x" in text  # mean TTFT 100 ms -> 50 ms


def test_safetensors_writer_round_trips(tmp_path):
    from safetensors.numpy import load_file

    t = {"b": np.arange(6, dtype=np.float16).reshape(2, 3), "a": np.ones((1, 5), np.float32),
         "c": np.array([3, -1], np.int64)}
    save_file(t, tmp_path / "x.safetensors", {"format": "pt"})
    back = load_file(str(tmp_path / "x.safetensors"))
    assert set(back) == set(t) and all(np.array_equal(back[k], t[k]) and back[k].dtype == t[k].dtype for k in t)
    assert (int.from_bytes(serialize(t)[:8], "little") % 8) == 0
    v = np.array([1.0, -2.5, 3.14159, 1e-3, 65504.0], np.float32)
    bf = BF16Array(v)
    assert np.allclose(bf.to_float32(), v, rtol=1e-2)
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file as torch_load

    save_file({"w": bf}, tmp_path / "bf.safetensors")
    w = torch_load(str(tmp_path / "bf.safetensors"))["w"]
    assert w.dtype == torch.bfloat16 and torch.equal(w, torch.tensor(v).to(torch.bfloat16))
