"""API keys: a JSON or TOML file maps each key (or its sha256) to a tenant and a role; constant-time lookup."""
# File format (JSON shown; TOML with the same tables works too):
#   {"keys": {"sk-acme-0123456789abcdef": {"tenant": "acme"},
#             "sha256:<64 hex digits>": {"tenant": "ops", "role": "admin"}},
#    "tenants": {"acme": {"requests_per_s": 5, "tokens_per_s": 2000}}}
# "keys" may also be a list of {"key": ..., "tenant": ..., "role": ...} or {"sha256": ..., ...} entries.
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import stat
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("loramux.auth")
ROLES = ("user", "admin")
TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
LIMIT_FIELDS = ("requests_per_s", "tokens_per_s")


class KeyFileError(ValueError):
    """The API keys file is missing, unreadable or malformed (the message says where)."""


@dataclass(frozen=True)
class Principal:
    """Who is calling: tenant None with role admin is the open single-tenant mode."""

    tenant: str | None
    role: str = "user"

    @property
    def admin(self) -> bool:
        return self.role == "admin"


OPEN = Principal(None, "admin")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class KeyStore:
    def __init__(self, entries: list[tuple[bytes, Principal]], tenant_limits: dict[str, dict] | None = None):
        self._entries = list(entries)
        self.tenant_limits = dict(tenant_limits or {})

    def __len__(self) -> int:
        return len(self._entries)

    def tenants(self) -> list[str]:
        return sorted({p.tenant for _, p in self._entries if p.tenant is not None})

    def authenticate(self, presented: str | None) -> Principal | None:
        """The principal of a presented key, or None. Every stored digest is compared, each in constant time,
        so neither the answer's timing nor an early exit tells how much of a key was right."""
        if not presented:
            return None
        digest = _digest(presented)
        found = None
        for stored, principal in self._entries:
            if hmac.compare_digest(stored, digest):
                found = principal
        return found

    @classmethod
    def from_file(cls, path: Path) -> "KeyStore":
        path = Path(path)
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise KeyFileError(f"--api-keys {path}: cannot read ({exc.strerror or exc})") from exc
        data = _parse(path, raw)
        store = cls.from_dict(data, str(path))
        try:
            if path.stat().st_mode & stat.S_IROTH and any(not k.startswith("sha256:") for k in _plain_keys(data)):
                log.warning("%s holds plaintext keys and is world-readable; chmod 600 it or store sha256 hashes",
                            path)
        except OSError:
            pass
        return store

    @classmethod
    def from_dict(cls, data: object, source: str = "api keys") -> "KeyStore":
        if not isinstance(data, dict) or "keys" not in data:
            raise KeyFileError(f"{source}: expected a table with a 'keys' entry")
        keys = data["keys"]
        items = list(keys.items()) if isinstance(keys, dict) else [(None, e) for e in keys] \
            if isinstance(keys, list) else None
        if not items:
            raise KeyFileError(f"{source}: 'keys' must be a non-empty table or list")
        entries, seen = [], set()
        for i, (name, entry) in enumerate(items):
            where = f"{source}: keys[{i}]"
            if not isinstance(entry, dict):
                raise KeyFileError(f"{where}: expected a table with tenant and role")
            digest = _entry_digest(name, entry, where)
            if digest in seen:
                raise KeyFileError(f"{where}: the same key is listed twice")
            seen.add(digest)
            tenant, role = entry.get("tenant"), entry.get("role", "user")
            if not isinstance(tenant, str) or not TENANT_RE.fullmatch(tenant):
                raise KeyFileError(f"{where}: tenant must be 1-64 letters, digits, '.', '_' or '-' "
                                   f"(starting with a letter or digit), got {tenant!r}")
            if role not in ROLES:
                raise KeyFileError(f"{where}: role must be 'user' or 'admin', got {role!r}")
            entries.append((digest, Principal(tenant, role)))
        limits = data.get("tenants", {})
        if not isinstance(limits, dict):
            raise KeyFileError(f"{source}: 'tenants' must be a table of tenant -> limits")
        for tenant, lim in limits.items():
            bad = [k for k in (lim if isinstance(lim, dict) else {None: 0}) if k not in LIMIT_FIELDS]
            if not isinstance(lim, dict) or bad or not all(isinstance(v, (int, float)) and v >= 0
                                                            for v in lim.values()):
                raise KeyFileError(f"{source}: tenants.{tenant}: allowed limits are {', '.join(LIMIT_FIELDS)} "
                                   "(numbers >= 0; 0 = unlimited)")
        return cls(entries, {t: dict(v) for t, v in limits.items()})


def _entry_digest(name: str | None, entry: dict, where: str) -> bytes:
    if name is not None:
        key, hashed = (name[7:], True) if name.startswith("sha256:") else (name, False)
    elif isinstance(entry.get("sha256"), str):
        key, hashed = entry["sha256"], True
    elif isinstance(entry.get("key"), str):
        key, hashed = entry["key"], False
    else:
        raise KeyFileError(f"{where}: give either key or sha256")
    if hashed:
        if not HEX64.fullmatch(key):
            raise KeyFileError(f"{where}: a sha256 key must be 64 hex digits")
        return bytes.fromhex(key)
    if len(key) < 8 or key != key.strip():
        raise KeyFileError(f"{where}: a key must be at least 8 characters, without surrounding spaces")
    if len(key) < 16:
        log.warning("%s: a key shorter than 16 characters is easy to guess", where)
    return _digest(key)


def _plain_keys(data: dict) -> list[str]:
    keys = data.get("keys")
    if isinstance(keys, dict):
        return list(keys)
    return [e["key"] for e in keys if isinstance(e, dict) and isinstance(e.get("key"), str)] \
        if isinstance(keys, list) else []


def _parse(path: Path, raw: bytes) -> object:
    if path.suffix.lower() == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            try:
                import tomli as tomllib
            except ImportError as exc:
                raise KeyFileError(f"--api-keys {path}: TOML needs Python 3.11+ (or tomli); use JSON") from exc
        try:
            return tomllib.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise KeyFileError(f"--api-keys {path}: invalid TOML ({exc})") from exc
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise KeyFileError(f"--api-keys {path}: invalid JSON ({exc})") from exc


def bearer_token(headers) -> str | None:
    """The key from `Authorization: Bearer <key>` in raw ASGI headers, or None."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None
