"""API keys -> tenants. Keys are kept only as sha256 digests and compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import Unauthorized
from .settings import Settings

log = logging.getLogger("taskdelta.auth")
# A task or tenant name. NAME_PATTERN is for pydantic and the OpenAPI schema (whose regex engine
# reads `$` as the end of the text); NAME_RE for Python, where `$` also matches before a trailing
# newline ("t\n" would pass `re.match` and then fail as a Redis key): `\Z` is the end only.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
NAME_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
DEFAULT_TENANT = "default"
ADMIN_TENANT = "admin"
RESERVED_TENANTS = frozenset({ADMIN_TENANT})  # the admin key's own namespace


def valid_name(name: str) -> bool:
    """A task or tenant name: the whole string matches NAME_RE (no trailing newline)."""
    return NAME_RE.fullmatch(name) is not None


def _tenant_name(name: str, where: str) -> str:
    if not valid_name(name):
        raise ValueError(f"{where}: bad tenant name {name!r}")
    if name in RESERVED_TENANTS:
        raise ValueError(f"{where}: the tenant name {name!r} is reserved for the admin key")
    return name


@dataclass(frozen=True)
class Tenant:
    name: str
    admin: bool = False


def _digest(entry: str) -> bytes:
    """A keys-file entry (a plain key, or `sha256:<hex>`) -> raw digest bytes."""
    if entry.startswith("sha256:") and len(entry) == 71:
        return bytes.fromhex(entry[7:])
    return hashlib.sha256(entry.encode()).digest()


class KeyRing:
    def __init__(self, entries: list[tuple[bytes, Tenant]], enabled: bool = True) -> None:
        self._entries = entries
        self.enabled = enabled

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing:
        if not settings.auth:
            return cls([], enabled=False)
        entries: list[tuple[bytes, Tenant]] = []
        if settings.keys_file is not None:
            entries += _read_keys_file(settings.keys_file)
        for pair in filter(None, (settings.api_keys or "").split(",")):
            tenant, _, key = pair.strip().partition(":")
            if not key:
                raise ValueError("TASKDELTA_API_KEYS must look like tenant:key,tenant:key")
            entries.append((_digest(key), Tenant(_tenant_name(tenant, "TASKDELTA_API_KEYS"))))
        if settings.admin_key:
            entries.append((_digest(settings.admin_key), Tenant(ADMIN_TENANT, admin=True)))
        if not entries:
            raise ValueError("auth is on but no API keys are configured: set TASKDELTA_KEYS_FILE "
                             "or TASKDELTA_API_KEYS, or TASKDELTA_AUTH=false for a local quickstart")
        return cls(entries)

    def authenticate(self, key: str | None) -> Tenant:
        if not self.enabled:
            return Tenant(DEFAULT_TENANT)
        if not key:
            raise Unauthorized("missing API key: send `Authorization: Bearer <key>`")
        presented = hashlib.sha256(key.encode()).digest()
        found: Tenant | None = None
        for digest, tenant in self._entries:  # no early exit: time does not depend on the match
            if hmac.compare_digest(digest, presented):
                found = tenant
        if found is None:
            raise Unauthorized("invalid API key")
        return found


def _read_keys_file(path: Path) -> list[tuple[bytes, Tenant]]:
    """{"tenants": {"acme": ["sha256:<hex>", ...]}, "admin": ["sha256:<hex>"]}."""
    raw = json.loads(Path(path).read_text())
    entries = []
    for tenant, keys in raw.get("tenants", {}).items():
        entries += [(_digest(k), Tenant(_tenant_name(tenant, "keys file"))) for k in keys]
    entries += [(_digest(k), Tenant(ADMIN_TENANT, admin=True)) for k in raw.get("admin", [])]
    if any(not k.startswith("sha256:") for keys in raw.get("tenants", {}).values() for k in keys):
        log.warning("keys file %s holds plain keys; store `taskdelta keys hash KEY` digests", path)
    return entries
