"""AdapterService: registry + CPU cache + loader + GPU slots behind one facade for the API and the scheduler."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from loramux.adapters.cache import CpuAdapterCache
from loramux.adapters.errors import NOT_FOUND, AdapterError
from loramux.adapters.loading import AdapterLoader
from loramux.adapters.registry import TOKENIZER_FILE, AdapterRegistry
from loramux.adapters.slots import SlotTable
from loramux.adapters.spec import BaseModelSpec

log = logging.getLogger("loramux.adapters")


class AdapterService:
    """Implements the scheduler's AdapterGate (try_acquire / release, called on the engine thread) and the
    REST-facing operations (upload, list, get, delete; called on the event loop)."""

    def __init__(self, root: Path, model_config: dict, dtype: torch.dtype, max_loras: int, max_lora_rank: int,
                 max_cpu_loras: int, max_adapter_bytes: int = 4 << 30):
        self.dtype = dtype
        self.spec = BaseModelSpec.from_hf_config(model_config, max_lora_rank, str(dtype).replace("torch.", ""))
        Path(root).mkdir(parents=True, exist_ok=True)
        self.registry = AdapterRegistry(Path(root), max_adapter_bytes)
        self.cache = CpuAdapterCache(max_cpu_loras)
        self.loader = AdapterLoader(self.registry, self.spec, dtype, self.cache)
        self.table = SlotTable(max_loras)
        self.device_slots = None  # runner.lora_slots.LoRASlots, attached once the model exists
        self.counters = {"gpu_hits": 0, "gpu_loads": 0, "gpu_evictions": 0, "disk_loads": 0, "waits": 0}
        self.load_seconds = {"gpu": 0.0}  # time spent copying adapters into device slots (engine thread)
        self._pending: set[str] = set()  # ids whose disk -> CPU load this service is waiting for
        self._slot_owner: dict[int, str] = {}  # last adapter written into each device slot

    # ---- engine thread: AdapterGate ----
    def try_acquire(self, adapter_id: str) -> bool:
        if self.table.is_loaded(adapter_id):
            if self.table.acquire(adapter_id) is not None:
                self.counters["gpu_hits"] += 1
                return True
            return False
        loaded = self.loader.poll(adapter_id)  # starts a background disk -> CPU load when needed
        if isinstance(loaded, AdapterError):
            self._pending.discard(adapter_id)
            raise loaded
        if loaded is None:
            self._pending.add(adapter_id)
            self.counters["waits"] += 1
            return False
        if adapter_id in self._pending:
            self._pending.discard(adapter_id)
            self.counters["disk_loads"] += 1
        if not self.table.can_acquire(adapter_id):
            self.counters["waits"] += 1
            return False
        got = self.table.acquire(adapter_id)
        if got is None:
            return False
        slot, needs_load = got
        if needs_load:
            if self._slot_owner.get(slot) not in (None, adapter_id):
                self.counters["gpu_evictions"] += 1
            self._slot_owner[slot] = adapter_id
            t0 = time.perf_counter()
            self.device_slots.load(slot, loaded)
            self.load_seconds["gpu"] += time.perf_counter() - t0
            self.table.mark_loaded(adapter_id)
            self.counters["gpu_loads"] += 1
        return True

    def release(self, adapter_id: str) -> None:
        self.table.release(adapter_id)

    # ---- API side ----
    def resolve(self, name: str, tenant: str | None = None) -> str:
        info = self.registry.get(name) if isinstance(name, str) else None
        if info is None or (tenant is not None and info.tenant not in (None, tenant)):
            raise AdapterError(f"the model {str(name)[:128]!r} does not exist", "model", NOT_FOUND)
        self.loader.request(name)  # warm the CPU cache while the request is queued
        return name

    def register_dir(self, adapter_id: str, path: Path, overwrite: bool = True) -> dict:
        """Startup registration (--adapter NAME=PATH): validated against the base model, public to all."""
        self.registry.add_dir(adapter_id, Path(path), None, self.spec, overwrite=overwrite)
        self._forget(adapter_id)
        return self.get(adapter_id)

    def upload(self, adapter_id: str, config_bytes: bytes, weights_bytes: bytes,
               tokenizer_config: bytes | None = None, tenant: str | None = None) -> dict:
        self.registry.add_files(adapter_id, config_bytes, weights_bytes, tenant, self.spec,
                                tokenizer_config=tokenizer_config)
        self._forget(adapter_id)
        return self.get(adapter_id, tenant)

    def _forget(self, adapter_id: str) -> None:
        self.loader.invalidate(adapter_id)
        self.table.evict(adapter_id)

    def _location(self, adapter_id: str) -> str:
        if self.table.is_loaded(adapter_id):
            return "gpu"
        return "cpu" if adapter_id in self.cache else "disk"

    def _describe(self, info) -> dict:
        return {"id": info.adapter_id, "rank": info.rank, "targets": list(info.targets), "size_bytes": info.size,
                "created": int(info.created), "location": self._location(info.adapter_id), "tenant": info.tenant,
                "base_model": info.base_model_name_or_path}

    def list(self, tenant: str | None = None) -> list[dict]:
        return [self._describe(i) for i in self.registry.list()
                if tenant is None or i.tenant in (None, tenant)]

    def get(self, adapter_id: str, tenant: str | None = None) -> dict:
        self.resolve(adapter_id, tenant)
        return self._describe(self.registry.get(adapter_id))

    def delete(self, adapter_id: str, tenant: str | None = None) -> None:
        self.resolve(adapter_id, tenant)
        self.registry.delete(adapter_id)
        self._forget(adapter_id)  # a slot still held by running requests is dropped at their last release

    def chat_template(self, adapter_id: str) -> str | None:
        path = self.registry.path_of(adapter_id)
        f = path / TOKENIZER_FILE if path is not None else None
        if f is None or not f.is_file():
            return None
        try:
            tpl = json.loads(f.read_text()).get("chat_template")
        except (OSError, ValueError):
            return None
        return tpl if isinstance(tpl, str) else None

    def stats(self) -> dict:
        cache = self.cache.stats()
        return {"slots_total": self.table.num_slots, "slots_in_use": len(self.table.held()),
                "resident": sorted(self.table.resident()), "cpu_cached": len(self.cache),
                "loads_total": {"gpu": self.counters["gpu_loads"], "disk": self.counters["disk_loads"]},
                "evictions_total": {"cpu": cache.get("evictions", 0), "gpu": self.counters["gpu_evictions"]},
                "hits_total": {"gpu": self.counters["gpu_hits"], "cpu": cache.get("hits", 0)},
                "waits_total": self.counters["waits"],
                "load_seconds_total": dict(self.load_seconds)}

    def close(self) -> None:
        self.loader.close()
