"""AdapterService: tenant store + CPU cache + loader + GPU slots behind one facade for the API and the scheduler."""
from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import torch

from loramux.adapters.cache import CpuAdapterCache
from loramux.adapters.errors import NOT_FOUND, AdapterError
from loramux.adapters.loading import AdapterLoader
from loramux.adapters.packed_store import PackedStore
from loramux.adapters.registry import TOKENIZER_FILE
from loramux.adapters.slots import SlotTable
from loramux.adapters.spec import BaseModelSpec
from loramux.server.adapter_gate import SlotGate
from loramux.server.adapter_store import AdapterStore, Ref, parse_key

log = logging.getLogger("loramux.adapters")
FORBIDDEN = 403


def packed_store(root: Path | None, max_bytes: int, spec: BaseModelSpec, dtype: torch.dtype) -> PackedStore | None:
    """The on-disk packed-form cache (adapters/packed_store.py), or None when root is None or max_bytes is 0;
    max_bytes < 0 sizes it from the free disk space (PackedStore)."""
    if root is None or max_bytes == 0:
        return None
    store = PackedStore(Path(root), spec, dtype, max_bytes)
    log.info("packed adapter cache %s: %.1f GiB held, bound %.1f GiB", root, store.nbytes / 2**30,
             store.max_bytes / 2**30)
    return store


class AdapterService(SlotGate):
    """Implements the scheduler's AdapterGate (SlotGate: called on the engine thread) and the REST-facing
    operations (upload, list, get, delete; called on the event loop or worker threads).
    Callers are (tenant, admin): tenant None is the open single-tenant mode (public namespace)."""

    def __init__(self, root: Path, model_config: dict, dtype: torch.dtype, max_loras: int, max_lora_rank: int,
                 max_cpu_loras: int, max_adapter_bytes: int = 4 << 30, max_cpu_bytes: int | None = None,
                 load_processes: int = 0, pin_cache: bool = False, packed_dir: Path | None = None,
                 max_packed_bytes: int = -1):
        self.dtype = dtype
        self.spec = BaseModelSpec.from_hf_config(model_config, max_lora_rank, str(dtype).replace("torch.", ""))
        Path(root).mkdir(parents=True, exist_ok=True)
        self.store = AdapterStore(Path(root), max_adapter_bytes)
        self.registry = self.store.public  # the public namespace (startup and demo adapters)
        # pageable by default: page-locking each adapter cost more than loading it on the H100 host; GPU uploads
        # pass through reused pinned staging buffers instead (runner/pinned_staging.py)
        self.cache = CpuAdapterCache(max_cpu_loras, max_cpu_bytes, pin=pin_cache and torch.cuda.is_available())
        self.packed = packed_store(packed_dir, max_packed_bytes, self.spec, dtype)
        self.loader = AdapterLoader(self.store, self.spec, dtype, self.cache,  # loads by key via store.path_of
                                    processes=load_processes, packed_store=self.packed)
        self.table = SlotTable(max_loras)
        self.device_slots = None  # runner.lora_slots.LoRASlots, attached once the model exists
        self._init_gate()
        self._write_lock = threading.Lock()  # publish + forget of one upload happen together

    # ---- API side ----
    def _find(self, name, tenant: str | None, admin: bool | None) -> Ref:
        ref = self.store.find(name, tenant, tenant is None if admin is None else admin)
        if ref is None:
            raise AdapterError(f"the model {str(name)[:128]!r} does not exist", "model", NOT_FOUND)
        return ref

    def resolve(self, name: str, tenant: str | None = None, admin: bool | None = None, hold: bool = False) -> str:
        """The engine key of what `name` means for this caller (404 if nothing it may see). With hold=True the
        version stays on disk until unhold(key), even if the adapter is replaced meanwhile."""
        ref = self._find(name, tenant, admin)
        key = self.store.hold_current(ref) if hold else self.store.key(ref)
        if key is None:  # deleted in between
            raise AdapterError(f"the model {str(name)[:128]!r} does not exist", "model", NOT_FOUND)
        if len(self.cache) + len(self.loader.loading()) < self.cache.max_adapters:
            self.loader.request(key)  # warm the CPU cache while queued, if that evicts nothing (else: prefetch)
        return key

    def unhold(self, key: str) -> None:
        gone = self.store.unhold(key)
        for k in gone:
            self._forget_key(k)
        if gone and self.packed is not None:
            self.packed.drop_missing()

    def register_dir(self, adapter_id: str, path: Path, overwrite: bool = True) -> dict:
        """Startup registration (--adapter NAME=PATH): validated against the base model, public to all."""
        with self._write_lock:
            self.registry.add_dir(adapter_id, Path(path), None, self.spec, overwrite=overwrite)
        self._published(Ref(None, adapter_id))
        return self.get(adapter_id)

    def _target(self, name: str, tenant: str | None, admin: bool | None) -> Ref:
        ref = self.store.target(name, tenant, tenant is None if admin is None else admin)
        reg = self.store.registry(ref.tenant)
        if ref.tenant is not None and not (reg is not None and ref.adapter_id in reg) \
                and ref.adapter_id in self.store.public:  # public ids are known to all: saying so leaks nothing
            raise AdapterError(f"adapter {ref.adapter_id!r} already exists (a public adapter)", "adapter_id", 409)
        return ref

    def upload(self, adapter_id: str, config_bytes: bytes, weights_bytes: bytes,
               tokenizer_config: bytes | None = None, tenant: str | None = None, replace: bool = False,
               admin: bool | None = None) -> dict:
        ref = self._target(adapter_id, tenant, admin)
        reg = self.store.registry(ref.tenant, create=True)
        reg.add_files(ref.adapter_id, config_bytes, weights_bytes, ref.tenant, self.spec, overwrite=replace,
                      tokenizer_config=tokenizer_config)
        return self._uploaded(ref, tenant)

    def staging_dir(self) -> Path:
        """A fresh temporary folder in the store's filesystem for a streamed upload (see upload_staged)."""
        return self.registry.staging_dir()

    def upload_staged(self, adapter_id: str, staged: Path, tenant: str | None = None, replace: bool = False,
                      admin: bool | None = None) -> dict:
        """Validate + publish the files streamed into `staged`; the folder is consumed either way."""
        import shutil

        try:
            ref = self._target(adapter_id, tenant, admin)
            reg = self.store.registry(ref.tenant, create=True)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        reg.add_staged(ref.adapter_id, staged, ref.tenant, self.spec, overwrite=replace)
        return self._uploaded(ref, tenant)

    def _uploaded(self, ref: Ref, tenant: str | None) -> dict:
        out = self._published(ref, tenant)
        key = self.store.key(ref)
        if key is not None:
            self.loader.prepack(key)  # its first request then maps the packed file instead of converting
        return out

    def _published(self, ref: Ref, tenant: str | None = None) -> dict:
        """After a new version: unheld older versions leave the disk and every tier; held ones stay."""
        for gone in self.store.prune(ref):
            self._forget_key(gone)
        self._forget_key(ref.qual)  # a bare (unversioned) key means "current": never reuse its old weights
        if self.packed is not None:
            self.packed.drop_missing()  # packed files of versions pruned just now
        info = self.store.info(ref)
        if info is None:
            raise AdapterError(f"adapter {ref.adapter_id!r} was deleted meanwhile", "adapter_id", NOT_FOUND)
        return self._describe(ref, info, tenant)

    def _forget_key(self, key: str) -> None:
        self.loader.invalidate(key)
        self.table.evict(key)  # deferred to the last release while running requests hold it

    def _forget(self, ref: Ref) -> None:
        keys = {k for k in list(self.table.resident()) + self.cache.ids() if parse_key(k)[0] == ref}
        for key in keys | {ref.qual}:
            self._forget_key(key)
        if self.packed is not None:
            self.packed.drop_missing()  # packed files of the deleted versions

    def _location(self, key: str) -> str:
        if self.table.is_loaded(key):
            return "gpu"
        return "cpu" if key in self.cache else "disk"

    def _describe(self, ref: Ref, info, tenant: str | None) -> dict:
        key = f"{ref.qual}@{info.version}"
        return {"id": self.store.name_for(ref, tenant), "rank": info.rank, "targets": list(info.targets),
                "size_bytes": info.size, "created": int(info.created), "location": self._location(key),
                "tenant": ref.tenant, "version": info.version, "base_model": info.base_model_name_or_path}

    def list(self, tenant: str | None = None, admin: bool | None = None) -> list[dict]:
        admin = tenant is None if admin is None else admin
        return [self._describe(ref, info, tenant) for ref, info in self.store.visible(tenant, admin)]

    def get(self, adapter_id: str, tenant: str | None = None, admin: bool | None = None) -> dict:
        ref = self._find(adapter_id, tenant, admin)
        info = self.store.info(ref)
        if info is None:
            raise AdapterError(f"the model {str(adapter_id)[:128]!r} does not exist", "model", NOT_FOUND)
        return self._describe(ref, info, tenant)

    def delete(self, adapter_id: str, tenant: str | None = None, admin: bool | None = None) -> None:
        ref = self._find(adapter_id, tenant, admin)
        if ref.tenant != tenant and not (tenant is None if admin is None else admin):
            raise AdapterError(f"adapter {ref.adapter_id!r} is public; only an admin may delete it", "adapter_id",
                               FORBIDDEN)
        self.store.registry(ref.tenant).delete(ref.adapter_id)
        self._forget(ref)  # a slot still held by running requests is dropped at their last release

    def chat_template(self, adapter_id: str) -> str | None:
        path = self.store.path_of(adapter_id)
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
                "evictions_total": {"cpu": cache.get("evictions", 0), "gpu": self.counters["gpu_evictions"]},
                "hits_total": {"gpu": self.counters["gpu_hits"], "cpu": cache.get("hits", 0)},
                "disk_load_phase_seconds": dict(self.loader.phase_seconds),
                **self._packed_stats(),
                **self.gate_stats()}

    def _packed_stats(self) -> dict:
        """packed_files / packed_bytes / packed_max_bytes (gauges) and packed_<event>_total counters."""
        if self.packed is None:
            return {}
        return {f"packed_{k}" if k in ("files", "bytes", "max_bytes") else f"packed_{k}_total": v
                for k, v in self.packed.stats().items()}

    def close(self) -> None:
        self.loader.close()
        if getattr(self.device_slots, "close", None) is not None:
            self.device_slots.close()
