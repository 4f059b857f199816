"""The many-adapter benchmark's open-loop replay (bench_many_adapters.run) and the cold path's time split: where a
request whose adapter is not in a GPU slot spends the time its warm neighbours do not (engine steps from arrival to
first token, by where the adapter was; each slot copy's host-side phases)."""
from __future__ import annotations

import random
import threading
import time

from loramux.server.engine.request import SamplingParams


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _tier(svc, aid: str) -> str:
    return "gpu" if svc.table.is_loaded(aid) else ("cpu" if svc.cache.peek(aid) is not None else "disk")


def _hint_at_arrivals(engine, svc, arrivals: list[float], adapters: list[str], t0: float, tiers: dict,
                      stop: threading.Event) -> None:
    """As the server does on its event-loop thread: at each arrival time note where the adapter is (tiers) and
    hint it, while the engine thread may be inside a step (the request is added at the next step boundary)."""
    for i, (at, aid) in enumerate(zip(arrivals, adapters)):
        if stop.wait(max(0.0, t0 + at - time.perf_counter())):
            return
        tiers[i] = _tier(svc, aid)
        engine.hint_adapter(aid)


def run(engine, svc, args, arrivals: list[float], adapters: list[str], vocab: int) -> dict:
    """Replay the arrivals (seconds from start); per request: cold at arrival?, TTFT, token times. With
    args.arrival_hints == "on", adapters are hinted at arrival from another thread, as the server does."""
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    rng = random.Random(2)
    prompts = [[rng.randrange(1, vocab) for _ in range(args.prompt_len)] for _ in range(16)]
    reqs: dict[str, dict] = {}
    loading_steps, steps, batch, step_ends = 0, 0, 0, []
    i, t0, stop, tiers = 0, time.perf_counter(), threading.Event(), {}
    if getattr(args, "arrival_hints", "off") == "on":
        threading.Thread(target=_hint_at_arrivals, args=(engine, svc, arrivals, adapters, t0, tiers, stop),
                         daemon=True).start()
    while i < len(arrivals) or engine.has_work():
        now = time.perf_counter() - t0
        while i < len(arrivals) and arrivals[i] <= now:
            rid, aid = f"r{i}", adapters[i]
            tier = tiers.get(i) or _tier(svc, aid)  # where the adapter was at arrival
            reqs[rid] = {"arrival": arrivals[i], "cold": tier != "gpu", "tier": tier, "times": [], "step": steps}
            engine.add_request(rid, prompts[i % len(prompts)], params, aid)
            i += 1
        if not engine.has_work():
            time.sleep(max(0.0, min(0.005, arrivals[i] - now)))
            continue
        loads = bool(svc.device_slots.in_flight() or svc.loader.loading() or svc._copying)
        outs = engine.step()
        t = time.perf_counter() - t0
        step_ends.append(t)
        loading_steps += loads
        steps, batch = steps + 1, batch + engine.last_step.num_requests
        for o in outs:
            if o.new_token_ids:
                reqs[o.request_id]["times"].append((t, loads))
                reqs[o.request_id].setdefault("first_step", steps)
        if engine.last_step.num_requests == 0:
            time.sleep(0.0005)
    wall = time.perf_counter() - t0
    stop.set()
    tokens = sum(len(r["times"]) for r in reqs.values())
    ttft = {k: [r["times"][0][0] - r["arrival"] for r in reqs.values() if r["cold"] == k and r["times"]]
            for k in (True, False)}
    itl_all, itl_loading, itl_quiet = [], [], []
    for r in reqs.values():
        if r["cold"]:
            continue
        for (a, _), (b, loads) in zip(r["times"], r["times"][1:]):
            itl_all.append(b - a)
            (itl_loading if loads else itl_quiet).append(b - a)
    by_tier = {t: [r["times"][0][0] - r["arrival"] for r in reqs.values() if r["tier"] == t and r["times"]]
               for t in ("cpu", "disk")}  # cold requests split by where their adapter was at arrival
    # engine steps from arrival to the step that returned the first token (1 = the first step after arrival)
    n_steps = {t: [r["first_step"] - r["step"] for r in reqs.values() if r["tier"] == t and "first_step" in r]
               for t in ("gpu", "cpu", "disk")}
    return {"requests": len(reqs), "wall_s": wall, "tok_s": tokens / wall, "cold_requests": len(ttft[True]),
            "cold_from_cpu": len(by_tier["cpu"]), "cold_from_disk": len(by_tier["disk"]),
            "ttft_cold_cpu_p50_ms": pct(by_tier["cpu"], 0.5) * 1e3,
            "ttft_cold_disk_p50_ms": pct(by_tier["disk"], 0.5) * 1e3,
            "ttft_warm_p50_ms": pct(ttft[False], 0.5) * 1e3, "ttft_cold_p50_ms": pct(ttft[True], 0.5) * 1e3,
            "ttft_warm_p90_ms": pct(ttft[False], 0.9) * 1e3, "ttft_cold_p90_ms": pct(ttft[True], 0.9) * 1e3,
            "itl_warm_p50_ms": pct(itl_all, 0.5) * 1e3, "itl_warm_p99_ms": pct(itl_all, 0.99) * 1e3,
            "itl_warm_loading_p99_ms": pct(itl_loading, 0.99) * 1e3,
            "itl_warm_quiet_p99_ms": pct(itl_quiet, 0.99) * 1e3,
            "steps_to_first_token_p50": {t: pct(v, 0.5) for t, v in n_steps.items()},
            "step_ms_p50": pct([b - a for a, b in zip(step_ends, step_ends[1:])], 0.5) * 1e3,
            "steps_with_loads": loading_steps, "requests_per_step": batch / max(steps, 1),
            "max_blocked_steps": engine.scheduler.max_blocked_steps}


def copy_phases(slots) -> dict[str, dict[str, float]]:
    """p50 / p90 in ms of LoRASlots.copy_trace (per async slot copy, from start_load: staged into pinned memory,
    copies issued, completion seen by a poll; device: the copy's own GPU time); empty without async copies."""
    trace = list(getattr(slots, "copy_trace", ()))
    if not trace:
        return {}
    return {k: {"p50": pct([c[k] for c in trace], 0.5) * 1e3, "p90": pct([c[k] for c in trace], 0.9) * 1e3,
                "n": len(trace)} for k in trace[0]}
