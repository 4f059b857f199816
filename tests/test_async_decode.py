"""Engine with decode steps launched one ahead (LORAMUX_ASYNC_DECODE=1, engine._launch_next): the same tokens and
finish reasons as the synchronous engine, through arrivals mid-run, stop tokens, length limits and aborts, with
every block given back. CPU, the embedded demo model, fp32."""
from __future__ import annotations

import pytest

from engine_helpers import make_engine
from loramux.server.engine.request import SamplingParams
from loramux.server.models.demo import ensure_demo_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return ensure_demo_model(tmp_path_factory.mktemp("demo"))


def drive(engine, jobs, stagger: int = 2, abort_at: dict | None = None):
    """Add jobs (id, prompt, params) one every `stagger` steps, abort ids at given step numbers, step until
    done -> ({id: tokens}, {id: finish reason}, steps that left a step launched ahead)."""
    tokens, reasons, step = {}, {}, 0
    pending = list(jobs)
    while pending or engine.has_work():
        if pending and step % stagger == 0:
            rid, prompt, params = pending.pop(0)
            engine.add_request(rid, prompt, params)
            tokens[rid] = []
        for rid in (abort_at or {}).get(step, []):
            if engine.abort(rid):
                reasons[rid] = "aborted"
        for o in engine.step():
            assert reasons.get(o.request_id) != "aborted", "output after abort"
            tokens[o.request_id].extend(o.new_token_ids)
            if o.finished:
                reasons[o.request_id] = o.finish_reason
        step += 1
        assert step < 5000
    assert engine.blocks.num_free == engine.blocks.num_blocks, "blocks leaked"
    return tokens, reasons, engine.steps_launched_ahead


def workload(stop_token: int | None):
    jobs = []
    for i in range(10):
        prompt = [(13 * i + 7 * j) % 200 + 3 for j in range(4 + 3 * i)]
        stop = [stop_token] if stop_token is not None and i % 3 == 0 else []
        jobs.append((f"r{i}", prompt, SamplingParams(max_tokens=6 + 5 * i, temperature=0.0, ignore_eos=True,
                                                     stop_token_ids=stop)))
    return jobs


def run(model_dir, monkeypatch, mode: str, jobs, **kw):
    monkeypatch.setenv("LORAMUX_ASYNC_DECODE", mode)
    engine = make_engine(model_dir, num_blocks=96, max_seqs=8, kernel_backend="torch")
    assert engine.async_decode == (mode == "1")
    return drive(engine, jobs, **kw)


def test_same_tokens_and_reasons_as_sync(model_dir, monkeypatch):
    plain, _, _ = run(model_dir, monkeypatch, "0", workload(None))
    stop = plain["r0"][3]  # a token the model does produce: requests r0, r3, r6, r9 may stop on it
    sync_tokens, sync_reasons, sync_ahead = run(model_dir, monkeypatch, "0", workload(stop))
    tokens, reasons, ahead = run(model_dir, monkeypatch, "1", workload(stop))
    assert sync_ahead == 0 and ahead > 20, ahead  # steps were in fact launched ahead
    assert "stop" in sync_reasons.values() and "length" in sync_reasons.values()
    assert tokens == sync_tokens and reasons == sync_reasons


def test_aborts_while_a_step_runs_ahead(model_dir, monkeypatch):
    jobs = [(f"a{i}", [5 + i, 9, 11, 2 * i + 1], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))
            for i in range(5)]
    tokens, reasons, ahead = run(model_dir, monkeypatch, "1", jobs, stagger=1, abort_at={12: ["a1", "a3"]})
    assert ahead > 10
    assert reasons["a1"] == reasons["a3"] == "aborted"
    assert all(reasons[f"a{i}"] == "length" and len(tokens[f"a{i}"]) == 30 for i in (0, 2, 4))
    assert 0 < len(tokens["a1"]) < 30 and 0 < len(tokens["a3"]) < 30


def test_sampled_rows_launch_ahead_with_the_same_tokens(model_dir, monkeypatch):
    """Seeded temperature / top-k / top-p / min-p rows are picked on the device too (Sampler.device_tokens), so
    they run ahead as well; each token depends only on its seed and position, so the tokens equal the synchronous
    engine's. A row with a penalty needs the host's token lists: while it runs, no step is launched ahead."""
    def jobs(penalty_row: bool):
        out = []
        for i in range(8):
            p = SamplingParams(max_tokens=10 + 4 * i, temperature=[0.0, 0.7, 1.2, 0.9][i % 4], top_k=[-1, 20][i % 2],
                               top_p=[1.0, 0.9, 0.8][i % 3], min_p=0.05 * (i % 2), seed=100 + i, ignore_eos=True)
            if penalty_row and i == 7:
                p.presence_penalty = 0.5
            out.append((f"s{i}", [(11 * i + 5 * j) % 200 + 3 for j in range(3 + 2 * i)], p))
        return out
    for penalty_row in (False, True):
        sync_tokens, sync_reasons, _ = run(model_dir, monkeypatch, "0", jobs(penalty_row))
        tokens, reasons, ahead = run(model_dir, monkeypatch, "1", jobs(penalty_row))
        assert tokens == sync_tokens and reasons == sync_reasons
        assert len({tuple(t) for t in tokens.values()}) == 8  # the sampled rows did not collapse to one stream
        if penalty_row:  # only the steps after s7 finished (its penalty rows) could run ahead
            assert ahead < ahead_free, (ahead, ahead_free)
        else:
            ahead_free = ahead
            assert ahead > 20, ahead


@pytest.mark.parametrize("mode,device,parallel,want", [
    (None, "cuda", None, True), (None, "cpu", None, False), ("0", "cuda", None, False), ("1", "cpu", None, True),
    (None, "cuda", object(), False)])
def test_mode_default_follows_the_device(monkeypatch, mode, device, parallel, want):
    """Unset (auto): on for a CUDA runner, off on CPU (no overlap to win there); never for a tensor-parallel one."""
    import torch
    from loramux.server.engine.engine import Engine
    from loramux.server.engine.scheduler import SchedulerConfig
    if mode is None:
        monkeypatch.delenv("LORAMUX_ASYNC_DECODE", raising=False)
    else:
        monkeypatch.setenv("LORAMUX_ASYNC_DECODE", mode)

    class Runner:
        def launch(self, *a, **k): ...
    runner = Runner()
    runner.device, runner.parallel = torch.device(device), parallel
    assert Engine(runner, SchedulerConfig(), 8, 4, []).async_decode is want


def test_runs_ahead_while_requests_wait_for_a_seat(model_dir, monkeypatch):
    """With every seat taken (max_num_seqs running), waiting requests cannot join the next step, so it still runs
    ahead; each waiting request starts once a seat frees (a step late at most), and the tokens equal sync's."""
    jobs = [(f"q{i}", [(7 * i + 3 * j) % 150 + 4 for j in range(3 + i)],
             SamplingParams(max_tokens=5 + 3 * (i % 4), temperature=0.0, ignore_eos=True)) for i in range(12)]

    def go(mode):
        monkeypatch.setenv("LORAMUX_ASYNC_DECODE", mode)
        engine = make_engine(model_dir, num_blocks=96, max_seqs=3, kernel_backend="torch")
        waited_ahead = 0
        for rid, prompt, params in jobs:
            engine.add_request(rid, prompt, params)
        tokens = {rid: [] for rid, _, _ in jobs}
        while engine.has_work():
            before = engine.steps_launched_ahead
            waiting = bool(engine.scheduler.waiting)
            for o in engine.step():
                tokens[o.request_id].extend(o.new_token_ids)
            waited_ahead += waiting and engine.steps_launched_ahead > before
        assert engine.blocks.num_free == engine.blocks.num_blocks
        return tokens, waited_ahead
    sync, _ = go("0")
    tokens, waited_ahead = go("1")
    assert tokens == sync
    assert waited_ahead > 5, waited_ahead


@pytest.mark.parametrize("value,want", [("on", True), ("yes", True), ("off", False), ("false", False), ("auto", False)])
def test_mode_spellings_and_typos(monkeypatch, value, want):
    """The usual on/off spellings work (a CPU runner: auto = off); a typo is a clear error at construction."""
    import torch
    from loramux.server.engine.engine import Engine
    from loramux.server.engine.scheduler import SchedulerConfig

    class Runner:
        device, parallel = torch.device("cpu"), None
        def launch(self, *a, **k): ...
    monkeypatch.setenv("LORAMUX_ASYNC_DECODE", value)
    assert Engine(Runner(), SchedulerConfig(), 8, 4, []).async_decode is want
    monkeypatch.setenv("LORAMUX_ASYNC_DECODE", "ture")
    with pytest.raises(ValueError, match="LORAMUX_ASYNC_DECODE='ture'"):
        Engine(Runner(), SchedulerConfig(), 8, 4, [])
