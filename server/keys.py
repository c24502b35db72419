"""Every Redis key the store uses, built in one place.

All keys of one tenant share the Redis Cluster hash tag `{t:<tenant>}`, so a tenant's task
metadata, blob chunks, task set and usage counter live in one slot and one Lua script may touch
them together. Only the global tenant set and the pub/sub channel sit outside any tenant's slot.

    td:tenants                                  set: tenant names (admin listing)
    td:changes                                  pub/sub channel: JSON Change messages
    td:{t:<tenant>}:tasks                       set: the tenant's task names
    td:{t:<tenant>}:usage                       hash: bytes -> total blob bytes stored
    td:{t:<tenant>}:task:<name>:meta            hash: the current version's metadata
    td:{t:<tenant>}:task:<name>:seq             counter: the last version handed out
    td:{t:<tenant>}:task:<name>:blob:<v>:<i>    string: chunk i of version v's blob
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import BadTaskRequest

_FORBIDDEN = frozenset("{}:")


class InvalidName(BadTaskRequest, ValueError):
    """A name no key may be built from: a 400 if one ever gets this far (the routes check names
    first), never a 500."""


def _checked(value: str, what: str) -> str:
    """Refuse names that could break out of a hash tag or collide with another key."""
    if not value:
        raise InvalidName(f"{what} name must not be empty")
    bad = sorted(_FORBIDDEN.intersection(value))
    if bad or any(c.isspace() for c in value):
        raise InvalidName(f"{what} name {value!r} contains a character not allowed in keys")
    return value


@dataclass(frozen=True)
class Keys:
    prefix: str = "td"

    def tenants(self) -> str:
        return f"{self.prefix}:tenants"

    def channel(self) -> str:
        return f"{self.prefix}:changes"

    def _tenant(self, tenant: str) -> str:
        return f"{self.prefix}:{{t:{_checked(tenant, 'tenant')}}}"

    def tasks(self, tenant: str) -> str:
        return f"{self._tenant(tenant)}:tasks"

    def usage(self, tenant: str) -> str:
        return f"{self._tenant(tenant)}:usage"

    def _task(self, tenant: str, name: str) -> str:
        return f"{self._tenant(tenant)}:task:{_checked(name, 'task')}"

    def meta(self, tenant: str, name: str) -> str:
        return f"{self._task(tenant, name)}:meta"

    def seq(self, tenant: str, name: str) -> str:
        return f"{self._task(tenant, name)}:seq"

    def chunk(self, tenant: str, name: str, version: int, index: int) -> str:
        return f"{self._task(tenant, name)}:blob:{version}:{index}"

    def chunks(self, tenant: str, name: str, version: int, count: int) -> list[str]:
        return [self.chunk(tenant, name, version, i) for i in range(count)]
