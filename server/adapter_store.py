"""AdapterStore: one registry per tenant, name resolution per caller, versioned engine keys, holds on old versions."""
# Namespaces: root/ holds the public adapters (--adapter, demo adapters, uploads of the open single-tenant mode);
# root/_tenants/<tenant>/ holds one tenant's uploads ('_' never starts an adapter id, so the two cannot clash).
# The engine, the slot table, the CPU cache and the loader know an adapter by its key "<qual>@<version>", where
# qual is "<id>" (public) or "<tenant>/<id>". Versions are immutable: a replace publishes a new key, and an older
# version stays on disk while a request holds its key (so in-flight requests keep the weights they started with).
from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from loramux.adapters.registry import ID_RE, AdapterInfo, AdapterRegistry, check_id

TENANTS_DIR = "_tenants"


@dataclass(frozen=True)
class Ref:
    """One adapter: its namespace (None = public) and its id there."""

    tenant: str | None
    adapter_id: str

    @property
    def qual(self) -> str:
        return self.adapter_id if self.tenant is None else f"{self.tenant}/{self.adapter_id}"


def parse_key(key: str) -> tuple[Ref, int | None]:
    """'<qual>[@<version>]' -> (Ref, version or None for "the current one")."""
    qual, _, ver = key.partition("@")
    tenant, slash, aid = qual.partition("/")
    ref = Ref(tenant, aid) if slash else Ref(None, qual)
    return ref, (int(ver) if ver.isdigit() else None)


def display_name(key: str | None) -> str | None:
    """A key without its version (metrics labels, logs)."""
    return None if key is None else key.partition("@")[0]


class AdapterStore:
    def __init__(self, root: Path, max_weights_bytes: int):
        self.root = Path(root)
        self.max_weights_bytes = max_weights_bytes
        self.public = self._open(self.root)
        self._regs: dict[str, AdapterRegistry] = {}
        self._lock = threading.RLock()
        self._holds: Counter[str] = Counter()
        tdir = self.root / TENANTS_DIR
        if tdir.is_dir():
            for p in sorted(tdir.iterdir()):
                if ID_RE.fullmatch(p.name) and p.is_dir() and not p.is_symlink():
                    self.registry(p.name, create=True)

    def _open(self, root: Path) -> AdapterRegistry:
        reg = AdapterRegistry(root, self.max_weights_bytes)
        reg.keep_old_versions = True  # this store prunes them once no request holds them
        return reg

    def registry(self, tenant: str | None, create: bool = False) -> AdapterRegistry | None:
        if tenant is None:
            return self.public
        with self._lock:
            reg = self._regs.get(tenant)
            if reg is None and create:
                check_id(tenant, "tenant")
                reg = self._regs[tenant] = self._open(self.root / TENANTS_DIR / tenant)
            return reg

    def tenants(self) -> list[str]:
        with self._lock:
            return sorted(self._regs)

    # ---- names ----
    def find(self, name: object, tenant: str | None, admin: bool) -> Ref | None:
        """What `name` means for a caller: its own adapter, else a public one; 'tenant/id' for admins (or self)."""
        if not isinstance(name, str) or len(name) > 300:
            return None
        if "/" in name:
            t, _, aid = name.partition("/")
            if not (admin or t == tenant) or not ID_RE.fullmatch(t):
                return None
            reg = self.registry(t)
            return Ref(t, aid) if reg is not None and aid in reg else None
        if tenant is not None:
            reg = self.registry(tenant)
            if reg is not None and name in reg:
                return Ref(tenant, name)
        return Ref(None, name) if name in self.public else None

    def target(self, name: str, tenant: str | None, admin: bool) -> Ref:
        """Where an upload named `name` goes: the caller's namespace, or 'tenant/id' for admins."""
        if "/" in str(name):
            t, _, aid = str(name).partition("/")
            if not (admin or t == tenant):
                check_id(name)  # "invalid adapter_id ..." (never says whether the tenant exists)
            check_id(t, "adapter_id")
            return Ref(t, check_id(aid))
        return Ref(tenant, check_id(name))

    @staticmethod
    def name_for(ref: Ref, tenant: str | None) -> str:
        """How a caller of `tenant` names ref: a plain id for its own and public adapters, else tenant/id."""
        return ref.adapter_id if ref.tenant in (None, tenant) else ref.qual

    def visible(self, tenant: str | None, admin: bool) -> list[tuple[Ref, AdapterInfo]]:
        out = [(Ref(None, i.adapter_id), i) for i in self.public.list()]
        for t in (self.tenants() if admin else [tenant] if tenant is not None else []):
            reg = self.registry(t)
            out += [(Ref(t, i.adapter_id), i) for i in reg.list()] if reg is not None else []
        return out

    def info(self, ref: Ref) -> AdapterInfo | None:
        reg = self.registry(ref.tenant)
        return reg.get(ref.adapter_id) if reg is not None else None

    def key(self, ref: Ref) -> str | None:
        info = self.info(ref)
        return None if info is None else f"{ref.qual}@{info.version}"

    def path_of(self, key: str) -> Path | None:
        """The folder a key's weights load from (the loader's view of the store)."""
        ref, version = parse_key(key)
        reg = self.registry(ref.tenant)
        return reg.path_of(ref.adapter_id, version) if reg is not None else None

    # ---- holds on versions ----
    def hold_current(self, ref: Ref) -> str | None:
        """The key of ref's current version, held (atomic with prune(): a held version is never removed)."""
        with self._lock:
            key = self.key(ref)
            if key is not None:
                self._holds[key] += 1
            return key

    def unhold(self, key: str) -> list[str]:
        """Drop one hold; returns the keys of versions pruned because nobody holds them any more."""
        with self._lock:
            self._holds[key] -= 1
            if self._holds[key] > 0:
                return []
            del self._holds[key]
        return self.prune(parse_key(key)[0])

    def held(self) -> dict[str, int]:
        with self._lock:
            return dict(self._holds)

    def prune(self, ref: Ref) -> list[str]:
        """Remove the versions of ref that are neither current nor held; returns their keys."""
        reg = self.registry(ref.tenant)
        if reg is None:
            return []
        with self._lock:
            keep = {v for v in reg.versions(ref.adapter_id) if self._holds.get(f"{ref.qual}@{v}", 0) > 0}
            return [f"{ref.qual}@{v}" for v in reg.prune(ref.adapter_id, keep)]
