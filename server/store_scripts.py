"""The store's Lua scripts, run atomically by Redis, and what their answers mean.

`SWITCH` commits a put (a new version's chunks become the task's) after checking if_match, a
concurrent writer and the tenant's quotas; `DELETE` removes a task. Both publish the change.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import QuotaExceeded, ServerError, StoreUnavailable, VersionConflict

# KEYS: meta, tasks, usage, the new version's chunks (n_new), the old version's chunks.
# ARGV: name, version, if_match, max_tasks, max_bytes, size, n_new, expected current version,
#       check_only, channel, change message, grace (ms), then the new metadata's field/value
#       pairs. '' stands for "none". Returns {status, detail}; a refusal deletes the new chunks.
# The old version's chunks are deleted, or left to expire after the grace for readers still
# reading them.
SWITCH = """
local meta, tasks, usage = KEYS[1], KEYS[2], KEYS[3]
local name, version, if_match = ARGV[1], ARGV[2], ARGV[3]
local max_tasks, max_bytes, size = ARGV[4], ARGV[5], tonumber(ARGV[6])
local n_new, expected, check_only = tonumber(ARGV[7]), ARGV[8], ARGV[9] == '1'
local function refuse(status, detail)
  for i = 4, 3 + n_new do redis.call('DEL', KEYS[i]) end
  return {status, detail}
end
local cur = redis.call('HGET', meta, 'version')
if not check_only and cur == version then return {'ok', 'applied before'} end
if if_match ~= '' and cur ~= if_match then return refuse('conflict', cur or '') end
if not check_only and cur and tonumber(cur) > tonumber(version) then
  return refuse('superseded', cur)
end
if not check_only and (cur or '') ~= expected then return {'moved', cur or ''} end
local old_size = 0
if cur then old_size = tonumber(redis.call('HGET', meta, 'bytes') or '0') end
if not cur and max_tasks ~= '' then
  local n = redis.call('SCARD', tasks)
  if n + 1 > tonumber(max_tasks) then return refuse('quota_tasks', tostring(n)) end
end
local after = tonumber(redis.call('HGET', usage, 'bytes') or '0') - old_size + size
if max_bytes ~= '' and after > tonumber(max_bytes) then
  return refuse('quota_bytes', tostring(after))
end
if check_only then return {'ok', ''} end
for i = 4, 3 + n_new do
  if redis.call('EXISTS', KEYS[i]) == 0 then return refuse('expired', '') end
  redis.call('PERSIST', KEYS[i])
end
local fields = {}
for i = 13, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('DEL', meta)
redis.call('HSET', meta, unpack(fields))
redis.call('SADD', tasks, name)
redis.call('HINCRBY', usage, 'bytes', size - old_size)
local grace = tonumber(ARGV[12])
for i = 4 + n_new, #KEYS do
  if grace > 0 then redis.call('PEXPIRE', KEYS[i], grace) else redis.call('DEL', KEYS[i]) end
end
redis.call('PUBLISH', ARGV[10], ARGV[11])
return {'ok', cur or ''}
"""

# KEYS: meta, tasks, usage, the expected version's chunks.
# ARGV: name, if_match, expected current version, channel, change message.
DELETE = """
local cur = redis.call('HGET', KEYS[1], 'version')
if not cur then return {'missing', ''} end
if ARGV[2] ~= '' and cur ~= ARGV[2] then return {'conflict', cur} end
if cur ~= ARGV[3] then return {'moved', cur} end
local size = tonumber(redis.call('HGET', KEYS[1], 'bytes') or '0')
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
redis.call('HINCRBY', KEYS[3], 'bytes', -size)
for i = 4, #KEYS do redis.call('DEL', KEYS[i]) end
redis.call('PUBLISH', ARGV[4], ARGV[5])
return {'ok', cur}
"""


def opt(value: int | None) -> str:
    return "" if value is None else str(value)


@dataclass(frozen=True)
class PutRequest:
    """One put as the switch script sees it, and what the script's refusals mean to a client."""
    tenant: str
    name: str
    size: int
    if_match: int | None
    max_tasks: int | None
    max_bytes: int | None

    def refusal(self, status: str, detail: str) -> ServerError | None:
        """The error a switch script status means, None for success."""
        if status == "conflict":
            if not detail:
                return VersionConflict(f"task {self.name!r} does not exist "
                                       f"(if_match={self.if_match})")
            return VersionConflict(f"task {self.name!r} is at version {detail}, "
                                   f"not {self.if_match}")
        if status == "quota_tasks":
            return QuotaExceeded(f"tenant {self.tenant!r} already has {detail} tasks, "
                                 f"the limit is {self.max_tasks}")
        if status == "quota_bytes":
            return QuotaExceeded(f"storing {self.size} bytes would bring tenant {self.tenant!r} "
                                 f"to {detail} bytes, the limit is {self.max_bytes}")
        if status == "expired":
            return StoreUnavailable(f"the upload of task {self.name!r} took too long; "
                                    "its chunks expired before it could be committed")
        if status == "moved":
            return StoreUnavailable(f"task {self.name!r} kept changing during the upload")
        return None  # ok, or superseded: a concurrent newer put won (last writer wins)
