"""Prometheus metrics (vLLM names where a meaning exists, loramux_* for adapters), one registry per app."""
from __future__ import annotations

import time
from typing import AsyncIterator

from fastapi import APIRouter, Request, Response
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, disable_created_metrics,
                               generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

router = APIRouter()

# Bucket edges as vLLM's (vllm/v1/metrics/loggers.py), so existing dashboards' quantiles line up.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)
OTHER = "other"  # label of every adapter past the first max_adapter_labels seen


class Metrics:
    """Every metric of one app. Request metrics are observed on the API side of each engine stream."""

    def __init__(self, runtime, max_adapter_labels: int = 32):
        self.runtime = runtime
        self.model = runtime.model_name
        self.max_adapter_labels = max_adapter_labels
        self._adapter_labels: dict[str, str] = {}
        disable_created_metrics()  # as vLLM: no *_created series (process-wide setting of prometheus_client)
        r = self.registry = CollectorRegistry()
        m = ["model_name"]
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prefill tokens processed.", m, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens.", m, registry=r)
        self.request_success = Counter("vllm:request_success", "Finished requests by finish reason.",
                                       m + ["finished_reason"], registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to the first generated token.", m,
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between generated tokens.", m,
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Request latency from arrival to finish.", m,
                             buckets=E2E_BUCKETS, registry=r)
        a = ["adapter"]
        self.adapter_requests = Counter("loramux_adapter_requests", "Sequences started per adapter (base model: "
                                        "its name; adapters past the label limit: 'other').", a, registry=r)
        self.adapter_prompt_tokens = Counter("loramux_adapter_prompt_tokens", "Prompt tokens per adapter.", a,
                                             registry=r)
        self.adapter_generation_tokens = Counter("loramux_adapter_generation_tokens",
                                                 "Generated tokens per adapter.", a, registry=r)
        r.register(_LiveCollector(runtime))

    def adapter_label(self, adapter_id: str | None) -> str:
        """Bounded label: the base model's name, the first N adapter ids seen (sticky), then 'other'."""
        if adapter_id is None:
            return self.model
        label = self._adapter_labels.get(adapter_id)
        if label is None:
            label = adapter_id if len(self._adapter_labels) < self.max_adapter_labels else OTHER
            if label != OTHER:
                self._adapter_labels[adapter_id] = label
        return label

    async def track(self, stream: AsyncIterator, adapter_id: str | None) -> AsyncIterator:
        """Pass an engine stream through, observing TTFT, ITL, e2e latency, token counts and the outcome."""
        label = self.adapter_label(adapter_id)
        self.adapter_requests.labels(label).inc()
        start = time.monotonic()
        last: float | None = None
        reason = "abort"  # consumer went away before the end
        prompt_counted = False
        try:
            async for d in stream:
                now = time.monotonic()
                if d.error:
                    reason = "error"
                    yield d
                    return
                if not prompt_counted and d.prompt_tokens:
                    prompt_counted = True
                    self.prompt_tokens.labels(self.model).inc(d.prompt_tokens)
                    self.adapter_prompt_tokens.labels(label).inc(d.prompt_tokens)
                n = len(d.token_ids)
                if n:
                    self.generation_tokens.labels(self.model).inc(n)
                    self.adapter_generation_tokens.labels(label).inc(n)
                    if last is None:
                        self.ttft.labels(self.model).observe(now - start)
                    else:
                        for _ in range(n):
                            self.itl.labels(self.model).observe((now - last) / n)
                    last = now
                if d.finish_reason is not None:
                    reason = d.finish_reason
                yield d
        finally:
            self.request_success.labels(self.model, reason).inc()
            if reason not in ("abort", "error"):
                self.e2e.labels(self.model).observe(time.monotonic() - start)


def _snapshot(seq) -> list:
    """A copy of a list/deque the engine thread may be mutating."""
    for _ in range(10):
        try:
            return list(seq)
        except RuntimeError:  # deque mutated during iteration
            continue
    return []


class _LiveCollector:
    """Gauges read at scrape time from the engine and the adapter service."""

    def __init__(self, runtime):
        self.rt = runtime

    def describe(self):
        return []

    def collect(self):
        rt, model = self.rt, self.rt.model_name
        sched = rt.engine.scheduler
        running, waiting = _snapshot(sched.running), _snapshot(sched.waiting)
        yield _gauge("vllm:num_requests_running", "Requests in the running batch.", model, len(running))
        yield _gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.", model, len(waiting))
        yield _gauge("vllm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).", model,
                     float(rt.engine.blocks.usage))
        info = GaugeMetricFamily("vllm:lora_requests_info", "Running and waiting adapters; value: update time.",
                                 labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
        run_ids = sorted({r.adapter_id.partition("@")[0] for r in running if r.adapter_id is not None})
        wait_ids = sorted({r.adapter_id.partition("@")[0] for r in waiting if r.adapter_id is not None})
        info.add_metric([str(rt.config.max_loras), ",".join(run_ids), ",".join(wait_ids)], time.time())
        yield info
        service = getattr(rt, "adapters", None)
        if service is None:
            return
        stats = service.stats()
        for key, help_ in (("slots_total", "GPU adapter slots."), ("slots_in_use", "GPU slots in use by requests."),
                           ("slots_loading", "GPU slots whose copy is still in flight."),
                           ("cpu_cached", "Adapters held in the CPU cache."),
                           ("packed_files", "Packed adapter files on disk (one per adapter version loaded)."),
                           ("packed_bytes", "Bytes of packed adapter files on disk."),
                           ("packed_max_bytes", "Bound on the bytes of packed adapter files.")):
            if key in stats:
                yield _gauge(f"loramux_adapter_{key}", help_, None, stats[key])
        if "resident" in stats:
            yield _gauge("loramux_adapter_resident", "Adapters resident in GPU slots.", None, len(stats["resident"]))
        for key, help_ in (("loads_total", "Adapter loads by destination tier."),
                           ("evictions_total", "Adapter evictions by tier."),
                           ("hits_total", "Adapter lookups by the tier that held it."),
                           ("load_seconds_total", "Seconds spent loading adapters, by tier."),
                           ("prefetches_total", "Adapter loads started ahead of admission, by tier."),
                           ("prefetch_hits_total", "Adapters found ready thanks to a prefetch, by tier.")):
            if isinstance(stats.get(key), dict):
                fam = CounterMetricFamily(f"loramux_adapter_{key}", help_, labels=["tier"])
                for tier, value in sorted(stats[key].items()):
                    fam.add_metric([str(tier)], value)
                yield fam
        if isinstance(stats.get("disk_load_phase_seconds"), dict):
            fam = CounterMetricFamily("loramux_adapter_disk_load_phase_seconds", "Seconds of disk -> CPU adapter "
                                      "loads by step: read, decode, alloc (page-locking), pack, check, map "
                                      "(a packed file), save (writing one).",
                                      labels=["phase"])
            for phase, value in sorted(stats["disk_load_phase_seconds"].items()):
                fam.add_metric([phase], value)
            yield fam
        yield from _histograms(stats)
        for key, value in sorted(stats.items()):  # any other scalar counter the service adds (e.g. waits_total)
            if key == "slots_total":  # a gauge above (a capacity, not a count of events)
                continue
            if key.endswith("_total") and isinstance(value, (int, float)) and not isinstance(value, bool):
                yield CounterMetricFamily(f"loramux_adapter_{key}", f"Adapter service counter {key}.", value)


def _histograms(stats: dict):
    """Adapter latency histograms from the service's snapshots ({"buckets": [(le, cumulative)], "sum", "count"})."""
    def buckets(snap: dict) -> list:
        return [(repr(float(le)), n) for le, n in snap["buckets"]] + [("+Inf", snap["count"])]

    tiers = stats.get("load_latency_seconds")
    if isinstance(tiers, dict):
        fam = HistogramMetricFamily("loramux_adapter_load_latency_seconds", "Adapter load latency by tier: disk "
                                    "(read + validate into CPU memory), gpu (copy start -> slot usable).",
                                    labels=["tier"])
        for tier, snap in sorted(tiers.items()):
            fam.add_metric([str(tier)], buckets(snap), snap["sum"])
        yield fam
    snap = stats.get("wait_seconds")
    if isinstance(snap, dict):
        fam = HistogramMetricFamily("loramux_adapter_wait_seconds", "Time admitted adapter requests were passed "
                                    "over for their adapter (loading, no free slot), observed at admission.")
        fam.add_metric([], buckets(snap), snap["sum"])
        yield fam


class AdmissionCollector:
    """Backpressure at scrape time: admitted sequences, uploads in progress, refusals, draining."""

    def __init__(self, admission, runtime):
        self.admission, self.rt = admission, runtime

    def describe(self):
        return []

    def collect(self):
        snap = self.admission.snapshot()
        yield _gauge("loramux_admitted_sequences", "Sequences admitted (running + waiting).", None, snap["in_flight"])
        yield _gauge("loramux_admission_bound", "Most sequences admitted at once (beyond: 503).", None,
                     snap["max_in_flight"])
        yield _gauge("loramux_uploads_in_progress", "Adapter uploads being received.", None, snap["uploads"])
        yield _gauge("loramux_draining", "1 while a graceful shutdown drains the server.", None,
                     int(bool(getattr(self.rt, "draining", False))))
        fam = CounterMetricFamily("loramux_requests_rejected", "Requests refused by admission: rate_limited "
                                  "(429) or full (503).", labels=["reason"])
        for reason in ("rate_limited", "full"):
            fam.add_metric([reason], snap[reason])
        yield fam


def _gauge(name: str, help_: str, model: str | None, value) -> GaugeMetricFamily:
    fam = GaugeMetricFamily(name, help_, labels=["model_name"] if model is not None else [])
    fam.add_metric([model] if model is not None else [], float(value))
    return fam


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
