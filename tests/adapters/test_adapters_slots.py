"""SlotTable: refcounts never leak or go negative; only idle slots are evicted, least recent first."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loramux.adapters.slots import SlotTable

IDS = [f"a{i}" for i in range(5)]
# acquire/release weighted up so tables fill, drain and refill often
OPS = st.lists(st.tuples(st.sampled_from(["acquire"] * 3 + ["release"] * 3 + ["evict", "load"]),
                         st.sampled_from(IDS)), min_size=4, max_size=150)


@settings(max_examples=500, deadline=None)
@given(num_slots=st.integers(0, 3), ops=OPS)
def test_refcounts_match_a_reference_model(num_slots, ops):
    t = SlotTable(num_slots)
    held: dict[str, int] = {}  # reference: running requests per adapter
    for op, aid in ops:
        before = t.resident()
        if op == "acquire":
            was_loaded = t.is_loaded(aid)
            doomed = aid in before and t.refcount(aid) > 0 and not t.can_acquire(aid)
            got = t.acquire(aid)
            if got is None:  # only when every slot is held, or the id awaits deferred eviction
                assert doomed or len([a for a in held if held[a] > 0]) == num_slots
                assert t.resident() == before
            else:
                slot, needs_load = got
                assert 0 <= slot < num_slots
                if aid in before:
                    assert before[aid] == slot and needs_load == (not was_loaded)
                else:
                    assert needs_load and set(t.resident()) <= set(before) | {aid}
                    evicted = set(before) - set(t.resident())
                    assert all(held.get(e, 0) == 0 for e in evicted)  # never a held slot
                held[aid] = held.get(aid, 0) + 1
        elif op == "release":
            if held.get(aid, 0) == 0:
                with pytest.raises(ValueError):
                    t.release(aid)
                assert t.resident() == before
            else:
                t.release(aid)
                held[aid] -= 1
        elif op == "evict":
            gone_now = t.evict(aid)
            assert gone_now == (held.get(aid, 0) == 0)
            if gone_now:
                assert aid not in t.resident()
        elif aid in before:  # "load": the runner copied the weights into the slot
            t.mark_loaded(aid)
            assert t.is_loaded(aid)
        else:
            with pytest.raises(ValueError):
                t.mark_loaded(aid)
        res = t.resident()
        assert len(res) <= num_slots and len(set(res.values())) == len(res)  # injective id -> slot
        for a in IDS:
            assert t.refcount(a) == held.get(a, 0) >= 0
            if held.get(a, 0):
                assert a in res  # a held adapter never loses its slot
        assert t.held() == {a: n for a, n in held.items() if n}
        assert t.idle() == (not any(held.values()))
    for aid, n in list(held.items()):  # releasing everything always drains the table
        for _ in range(n):
            t.release(aid)
    assert t.idle() and t.held() == {}


def test_lru_eviction_of_idle_slots_only():
    t = SlotTable(2)
    assert t.acquire("a") == (0, True) and t.acquire("b") == (1, True)
    assert t.acquire("c") is None  # both held
    t.mark_loaded("a")
    assert t.acquire("a") == (0, False)
    t.release("b")
    t.release("a")
    t.release("a")  # release order: b, then a -> b is least recent
    assert t.acquire("c") == (1, True) and t.lookup("b") is None and t.lookup("a") == 0
    assert t.acquire("a") == (0, False)  # kept its loaded slot


def test_evict_deferred_until_release():
    t = SlotTable(1)
    t.acquire("a")
    t.mark_loaded("a")
    assert t.evict("a") is False
    assert t.acquire("a") is None and t.acquire("b") is None and t.lookup("a") == 0
    t.release("a")
    assert t.lookup("a") is None and t.acquire("a") == (0, True)  # reloads: stale contents never reused


def test_slots_and_spec_import_no_torch():
    code = ("import sys; import loramux.adapters.slots, loramux.adapters.spec, loramux.adapters.errors; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_adapters_never_import_server():
    import loramux.adapters as pkg
    for f in Path(pkg.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            if isinstance(node, ast.ImportFrom) and node.level > 1:
                names = [".." + (node.module or "")]
            for n in names:
                assert not n.startswith(("loramux.server", "server", "..")), f"{f.name} imports {n}"
