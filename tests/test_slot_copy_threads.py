"""Asynchronous slot copies' thread protocol, on CPU with a stand-in for torch.cuda's streams and events: a
pageable packed adapter is staged (memcpy into a pinned-buffer stand-in) on the copy thread, and its copies are
issued on the thread that polls ready() (the engine thread), never on the copy thread, where each call would wait
for the engine thread's GIL. More loads than staging buffers neither deadlock nor leak, close() drains, and the
slots end up equal to blocking copies. The real CUDA path: tests/test_many_adapters_gpu.py."""
from __future__ import annotations

import contextlib
import threading
import time

import pytest
import torch

from loramux.adapters.loader import load_adapter
from loramux.adapters.spec import BaseModelSpec
from loramux.server.models.llama import DecoderModel
from loramux.server.models.model_config import ModelConfig
from loramux.server.runner.lora_slots import LoRASlots
from loramux.server.runner.pinned_staging import PinnedStaging
from test_packed_adapters import _real_parts


class _Event:
    def __init__(self, enable_timing=False):
        self.recorded = False

    def record(self, stream=None):
        self.recorded = True

    def query(self):
        return self.recorded

    def synchronize(self):
        pass

    def elapsed_time(self, other):
        return 1.0


class _Stream:
    def __init__(self, device=None):
        pass

    def wait_event(self, event):
        assert event.recorded, "waits for an event that was never recorded"


@pytest.fixture
def fake_cuda(monkeypatch):
    for name, value in (("Event", _Event), ("Stream", _Stream), ("current_stream", lambda device=None: _Stream()),
                        ("stream", lambda s: contextlib.nullcontext()),
                        ("device", lambda d: contextlib.nullcontext())):
        monkeypatch.setattr(torch.cuda, name, value)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from adapters_world import peft_world

    base, adapters = peft_world(tmp_path_factory.mktemp("copy-threads"))
    cfg = ModelConfig.from_dir(base)
    spec = BaseModelSpec.from_hf_config(cfg.raw, 16)
    return cfg, [load_adapter(path, spec, torch.float32) for path in adapters.values()]


def _slots(cfg, num_slots: int, async_copies: bool) -> LoRASlots:
    model = DecoderModel(cfg, 64, torch.float32, torch.device("cpu"))
    return LoRASlots(model, num_slots, 16, torch.float32, torch.device("cpu"), table=None, async_copies=async_copies)


def test_staged_on_the_copy_thread_issued_on_the_polling_thread(world, fake_cuda, monkeypatch):
    cfg, loaded = world
    ads = [ad for ad in loaded if ad.packed is not None][:5]
    assert len(ads) == 5 and not any(ad.packed.is_pinned for ad in ads)
    slots, want = _slots(cfg, 5, True), _slots(cfg, 5, False)
    slots._staging = PinnedStaging(2, pin=False)  # fewer buffers than loads: staging must wait for issues
    issued_on, real_write = [], slots._write_packed

    def write_packed(slot, packed, nb):
        issued_on.append(threading.get_ident())
        assert nb, "staged copies are non-blocking"
        real_write(slot, packed, nb)

    monkeypatch.setattr(slots, "_write_packed", write_packed)
    for slot, ad in enumerate(ads):
        slots.start_load(slot, ad)
        want.start_load(slot, ad)
    deadline = time.monotonic() + 30
    while not all([slots.ready(s) for s in range(5)]):
        assert time.monotonic() < deadline, "copies never completed (staging waits for buffers nobody gives back?)"
        time.sleep(0.001)
    assert issued_on == [threading.get_ident()] * 5  # every copy issued here, none on the copy thread
    assert not slots.in_flight() and slots.copy_seconds["staging"] > 0
    trace = list(slots.copy_trace)  # one entry per copy, its host-side phases in order (bench_many_adapters)
    assert len(trace) == 5 and all(0 < c["staged"] <= c["issued"] <= c["seen_done"] and c["device"] == 1e-3
                                   for c in trace)
    for slot in range(5):
        assert all(torch.equal(x, y) for x, y in zip(_real_parts(slots, slot), _real_parts(want, slot)))
    slots.close()


def test_close_drains_copies_nobody_polled(world, fake_cuda):
    cfg, loaded = world
    ads = [ad for ad in loaded if ad.packed is not None][:4]
    slots = _slots(cfg, 4, True)
    slots._staging = PinnedStaging(1, pin=False)
    for slot, ad in enumerate(ads):
        slots.start_load(slot, ad)
    done = threading.Event()
    threading.Thread(target=lambda: (slots.close(), done.set()), daemon=True).start()
    assert done.wait(30), "close() hung on staged copies that were never issued"


class _StepEvent:
    """A step's token event that completes `after_s` seconds from now; counts host-blocking synchronize calls."""

    def __init__(self, after_s: float):
        self.at, self.syncs = time.monotonic() + after_s, 0

    def query(self):
        return time.monotonic() >= self.at

    def synchronize(self):
        self.syncs += 1
        time.sleep(max(0.0, self.at - time.monotonic()))


def test_waiting_for_a_step_issues_copies_as_soon_as_staged(world, fake_cuda, monkeypatch):
    """While the engine thread waits for a step's tokens (runner.finish -> wait_for), a copy whose staging finishes
    meanwhile is issued then, on that thread, not at the next step boundary; with nothing to issue it just blocks."""
    cfg, loaded = world
    ads = [ad for ad in loaded if ad.packed is not None][:2]
    slots = _slots(cfg, 2, True)
    slots._staging = PinnedStaging(2, pin=False)
    real_stage, issued = slots._stage, []
    monkeypatch.setattr(slots, "_stage", lambda packed, times: (time.sleep(0.05), real_stage(packed, times))[1])
    real_write = slots._write_packed
    monkeypatch.setattr(slots, "_write_packed", lambda *a: (issued.append((threading.get_ident(),
                                                                           time.monotonic())), real_write(*a)))
    for slot, ad in enumerate(ads):
        slots.start_load(slot, ad)
    assert not issued  # still staging on the copy thread
    step = _StepEvent(0.4)
    slots.wait_for(step)
    assert [t for t, _ in issued] == [threading.get_ident()] * 2  # both issued during the wait, on this thread
    assert all(at < step.at for _, at in issued), "issued only when the step had completed"
    assert all(slots.ready(s) for s in range(2))
    idle = _StepEvent(0.02)
    slots.wait_for(idle)  # nothing in flight: one blocking wait, no polling
    assert idle.syncs == 1 and idle.query()
    slots.close()


def test_copy_waits_only_for_steps_that_read_its_slot(world, fake_cuda):
    """A copy into a slot waits for the last queued step whose tokens use that slot (ModelRunner.launch ->
    note_use), not for every queued step: a copy into a slot no queued step reads starts beside the step in flight."""
    cfg, loaded = world
    ads = [ad for ad in loaded if ad.packed is not None][:3]
    slots = _slots(cfg, 3, True)
    slots._staging = PinnedStaging(2, pin=False)
    waited = []

    class _Recording(_Stream):
        def wait_event(self, event):
            super().wait_event(event)
            waited.append(event)

    slots._stream = _Recording()

    def load(slot, ad):
        slots.start_load(slot, ad)
        deadline = time.monotonic() + 30
        while not slots.ready(slot):
            assert time.monotonic() < deadline
            time.sleep(0.001)

    slots.note_use([0, -1, 0, 2])  # a step reading slots 0 and 2
    step_a = slots.last_use[0]
    assert slots.last_use == {0: step_a, 2: step_a}
    load(1, ads[0])
    assert waited == []  # no queued step reads slot 1
    slots.note_use([2])
    step_b = slots.last_use[2]
    load(0, ads[1])
    load(2, ads[2])
    assert waited == [step_a, step_b] and step_a is not step_b
    slots.close()


def test_each_step_reports_the_slots_it_reads(tmp_path):
    """ModelRunner.launch hands every step's adapter slots to LoRASlots.note_use (what a later copy into one of
    them waits for); steps without adapter tokens report nothing."""
    from adapters_world import peft_world
    from loramux.server.engine.request import SamplingParams
    from test_many_adapters import _engine

    base, adapters = peft_world(tmp_path / "w", "llama", seed=3)
    ids = {f"ad{i}": path for i, path in enumerate(adapters.values())}
    engine, svc = _engine(base, tmp_path / "reg", ids, 2, 4)
    slots, seen = engine.runner.lora_slots, []
    slots.note_use = lambda token_slots: seen.append((sorted(set(token_slots)), slots.slot_of("ad0")))
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    engine.add_request("plain", [1, 2, 3], params, None)
    engine.step()
    assert seen == []  # no adapter token in the step
    engine.add_request("a", [1, 2, 3], params, "ad0")
    engine.add_request("b", [4, 5], params, None)
    deadline = time.monotonic() + 60
    while engine.has_work():
        assert time.monotonic() < deadline
        engine.step()
    assert seen and all(used in ([-1, ad0], [ad0]) and ad0 >= 0 for used, ad0 in seen), seen
