"""Redis memory shared fairly: what each tenant holds in Redis, counted, capped, and let go when
its data expires (docs/limits.md, "Storage").

What is counted: every large thing a tenant's requests leave in Redis. An execution's record
(the queued one the API stores, then the final one with its outputs, which replaces it), the
copy of a small final record in its "done" list, a batch (its specs, its items' states with
their executions and collected files), a webhook delivery (its body is the execution or batch
it reports). Each is one *entry* of the tenant's: a name (`exec:<id>`, `done:<id>`,
`batch:<id>`, `webhook:<owner>`), the bytes it holds plus ENTRY_OVERHEAD (the key, its
expiry, this bookkeeping), and the time its data expires. What is not counted, and why it is
bounded anyway, is in docs/limits.md: file transfers in flight (a few chunks each, deleted as
they are read), task messages, replies and the registry, all inside the headroom.

The design: per tenant, a sorted set of its entries scored by expiry time and a hash of their
sizes; one hash of totals, per tenant and for all tenants (`*`). Writing an entry again (the
final record replacing the queued one, a batch item saved again) replaces its size and expiry,
so the totals move by the difference. Expiry is the hard part, because Redis lets data go
silently: instead of tracking each key, an entry carries the same expiry as its data, and
entries whose time has passed are pruned lazily, a bounded number at a time: by beat's sweep
over every tenant (`sweep`, every few seconds, which also recounts the all-tenants total from
the per-tenant ones), and by a submission that would be refused, before it is (in the same Lua
script, so the check sees them gone; a submission that fits prunes nothing, which keeps the
admission short). Data deleted before its expiry (a done list read at once) stays counted until
then: the count errs on the side of refusing early. The entries' own keys carry a TTL past
their last entry's expiry, as a backstop; a tenant whose keys are gone counts zero.

The check: a new submission (an execution, a batch) is refused with 429 TenantStorageFull when
the tenant's total plus what the submission stores would pass its cap, and with 503
StorageFull when all tenants' total would pass their share of maxmemory (the rest is headroom
for heartbeats, the session registry and control writes, so they always succeed). What an
admitted execution or batch produces is always stored and counted, even past the cap: a result
is never lost; the tenant's next submission is refused instead. So a tenant passes its cap by at
most what its unfinished executions and running batch items produce (each within the output
budgets of docs/limits.md, "Outputs"), which the headroom absorbs. Reads and deletes are never
refused.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import redis

from shoal import keys, redis_conn
from shoal.errors import StorageFull, TenantStorageFull
from shoal.settings import Settings

# Counted on top of each entry's data: the key and its expiry in Redis, the entry's place in
# the tenant's sorted set and hash (measured with MEMORY USAGE: ~70 bytes for a string key,
# ~150 for the two bookkeeping places; rounded up).
ENTRY_OVERHEAD = 256
# Expired entries a submission about to be refused prunes of its tenant's (the rest wait for
# the next one, or for beat's sweep), and that one sweep prunes across all tenants: each is a
# bounded amount of work inside a Lua script, which blocks Redis while it runs.
PRUNE_LIMIT = 128
SWEEP_LIMIT = 20_000
# The entries' own keys outlive their last entry's expiry by up to this (a backstop: beat
# prunes each entry long before); their TTL is pushed out once it runs short of the newest
# entry's, so about once per this period, not on every write.
BACKSTOP_S = 3600
# The all-tenants total in the totals hash (no tenant name can be `*`).
ALL = "*"
# Retry-After when the all-tenants share is full: room comes back as any tenant's data expires.
ALL_FULL_RETRY_S = 60

# Lua functions shared by the scripts that count: `charge` writes one entry (its size replaces
# an earlier one's; `fresh`: there is none), `prune` drops up to `limit` entries expired by
# `now`, `refusal` says why a new entry of `size` bytes may not be stored (nil when it may), and
# `room` asks `refusal` again after pruning the tenant's expired entries when it would refuse.
# Sizes are whole bytes.
LUA_CHARGE = """
local function charge(tenant, zkey, hkey, totals, member, size, expiry, now, fresh)
  local old = 0
  if not fresh then old = tonumber(redis.call('HGET', hkey, member)) or 0 end
  redis.call('HSET', hkey, member, size)
  redis.call('ZADD', zkey, expiry, member)
  if size ~= old then
    redis.call('HINCRBY', totals, tenant, size - old)
    redis.call('HINCRBY', totals, '*', size - old)
  end
  local left = math.ceil(expiry - now)
  if redis.call('TTL', zkey) < left then
    redis.call('EXPIRE', zkey, left + BACKSTOP_S)
    redis.call('EXPIRE', hkey, left + BACKSTOP_S)
  end
end
""".replace("BACKSTOP_S", str(BACKSTOP_S))
LUA = (
    LUA_CHARGE
    + """
local function prune(tenant, zkey, hkey, totals, now, limit)
  local gone = redis.call('ZRANGEBYSCORE', zkey, '-inf', now, 'LIMIT', 0, limit)
  if #gone == 0 then return 0 end
  local freed = 0
  for _, size in ipairs(redis.call('HMGET', hkey, unpack(gone))) do
    freed = freed + (tonumber(size) or 0)
  end
  redis.call('HDEL', hkey, unpack(gone))
  redis.call('ZREM', zkey, unpack(gone))
  if freed ~= 0 then
    local left = redis.call('HINCRBY', totals, tenant, -freed)
    redis.call('HINCRBY', totals, '*', -freed)
    if left <= 0 then
      redis.call('HDEL', totals, tenant)
      if left < 0 then redis.call('HINCRBY', totals, '*', -left) end
    end
  end
  return #gone
end
local function refusal(tenant, zkey, totals, size, cap, all_cap, now)
  local used = redis.call('HMGET', totals, tenant, '*')
  local mine, all = tonumber(used[1]) or 0, tonumber(used[2]) or 0
  if mine + size > cap then
    local first = redis.call('ZRANGE', zkey, 0, 0, 'WITHSCORES')
    local retry = 1
    if first[2] then retry = math.max(math.ceil(tonumber(first[2]) - now), 1) end
    return {'storage', cap, mine, retry}
  end
  if all + size > all_cap then return {'storage_all', all_cap, all, 0} end
  return nil
end
local function room(tenant, zkey, hkey, totals, size, cap, all_cap, now)
  local refused = refusal(tenant, zkey, totals, size, cap, all_cap, now)
  if refused and prune(tenant, zkey, hkey, totals, now, PRUNE_LIMIT) > 0 then
    refused = refusal(tenant, zkey, totals, size, cap, all_cap, now)
  end
  return refused
end
""".replace("PRUNE_LIMIT", str(PRUNE_LIMIT))
)


@dataclass(frozen=True)
class Caps:
    """What a tenant may hold in Redis (its own `max_redis_mib` wins over `tenant`), and what
    all tenants together may hold."""

    tenant: int
    all_tenants: int


def caps(settings: Settings) -> Caps:
    return Caps(settings.tenant_max_redis_mib << 20, settings.tenants_redis_bytes)


def tenant_keys(tenant: str) -> list[str]:
    """The keys a counting script touches for `tenant`, in the order the scripts take them."""
    return [keys.tenant_storage(tenant), keys.tenant_storage_sizes(tenant), keys.storage_totals()]


def refuse(outcome: str, tenant: str, cap: int, used: int, retry_s: int) -> Exception:
    """The error for a refusal the scripts return ('storage' or 'storage_all')."""
    if outcome == "storage":
        return TenantStorageFull(
            f"tenant {tenant!r} holds {used} bytes in Shoal's Redis, and this would take it "
            f"past its {cap} (SHOAL_TENANT_MAX_REDIS_MIB, or its own max_redis_mib): records, "
            "outputs and batch results count until they expire (SHOAL_EXECUTION_TTL_S); room "
            "comes back as they do. Reads and deletes still work",
            retry_after_s=retry_s,
        )
    return StorageFull(
        f"all tenants' data in Shoal's Redis is at its share of Redis's memory ({used} of "
        f"{cap} bytes; SHOAL_REDIS_TENANTS_PCT of SHOAL_REDIS_MAXMEMORY_MIB); retry later",
        retry_after_s=ALL_FULL_RETRY_S,
    )


# Record entries (no check): ARGV: the tenant, now, then (member, size, ttl_s) per entry.
_CHARGE = (
    LUA_CHARGE
    + """
local now = tonumber(ARGV[2])
for i = 3, #ARGV, 3 do
  charge(ARGV[1], KEYS[1], KEYS[2], KEYS[3], ARGV[i], tonumber(ARGV[i + 1]),
         now + tonumber(ARGV[i + 2]), now)
end
return 1
"""
)


def charge(
    r: redis.Redis | redis.client.Pipeline, tenant: str, entries: list[tuple[str, int, float]]
) -> None:
    """Count `entries` (name, bytes of data, seconds until it expires) for `tenant`, never
    refusing: what an admitted execution or batch produced is stored whatever its size. Given
    a pipeline, only queued (sent as EVAL: a pipeline with EVALSHA first checks the script
    exists, one more round trip)."""
    args: list[str | int | float] = [tenant, f"{time.time():.6f}"]
    for member, size, ttl_s in entries:
        args += [member, int(size) + ENTRY_OVERHEAD, math.ceil(ttl_s)]
    r.eval(_CHARGE, 3, *tenant_keys(tenant), *args)


# Store a string and count it, in one step. KEYS: the tenant's three counting keys, the string.
# ARGV: the tenant, now, the entry's name, the body, its TTL, '1' to store only if absent.
# Returns 1 when stored.
_STORE = redis_conn.script(
    LUA_CHARGE
    + """
local now = tonumber(ARGV[2])
if ARGV[6] == '1' then
  if not redis.call('SET', KEYS[4], ARGV[4], 'EX', ARGV[5], 'NX') then return 0 end
else
  redis.call('SET', KEYS[4], ARGV[4], 'EX', ARGV[5])
end
local size = #ARGV[4] + ENTRY_OVERHEAD
charge(ARGV[1], KEYS[1], KEYS[2], KEYS[3], ARGV[3], size, now + tonumber(ARGV[5]), now)
return 1
""".replace("ENTRY_OVERHEAD", str(ENTRY_OVERHEAD))
)


def store(
    r: redis.Redis, tenant: str, key: str, member: str, body: str, ttl_s: int, nx: bool = False
) -> bool:
    """SET `key` to `body` for `ttl_s` (only if absent, with `nx`) and count it as `member`, in
    one round trip, never refusing; False when `nx` found the key there."""
    args = [tenant, f"{time.time():.6f}", member, body, int(ttl_s), "1" if nx else "0"]
    return bool(_STORE(keys=[*tenant_keys(tenant), key], args=args, client=r))


# Admit a new entry: check (pruning first if it would not fit), count. KEYS: the tenant's
# three counting keys, the tenant's own limits. ARGV: the tenant, now, the entry's name, its
# bytes, its TTL, the default tenant cap, the all-tenants cap. Returns {'ok'} or a refusal.
_RESERVE = redis_conn.script(
    LUA
    + """
local now = tonumber(ARGV[2])
local own = tonumber(redis.call('HGET', KEYS[4], 'max_redis_mib'))
local cap = tonumber(ARGV[6])
if own then cap = own * 1048576 end
local size = tonumber(ARGV[4])
local refused = room(ARGV[1], KEYS[1], KEYS[2], KEYS[3], size, cap, tonumber(ARGV[7]), now)
if refused then return refused end
charge(ARGV[1], KEYS[1], KEYS[2], KEYS[3], ARGV[3], size, now + tonumber(ARGV[5]), now)
return {'ok'}
"""
)


def reserve(r: redis.Redis, tenant: str, member: str, size: int, ttl_s: int, limits: Caps) -> None:
    """Count `size` bytes as `member` for `tenant` unless that takes it past its cap
    (TenantStorageFull) or all tenants past theirs (StorageFull), counting nothing then."""
    script_keys = [*tenant_keys(tenant), keys.tenant_limits(tenant)]
    args = [tenant, f"{time.time():.6f}", member, int(size) + ENTRY_OVERHEAD, int(ttl_s)]
    answer = _RESERVE(keys=script_keys, args=[*args, limits.tenant, limits.all_tenants], client=r)
    if answer[0] != "ok":
        raise refuse(answer[0], tenant, int(answer[1]), int(answer[2]), int(answer[3]))


# Beat's sweep: prune every tenant's expired entries (at most ARGV[6] in all), drop the totals
# of tenants whose entries' keys are gone, and recount the all-tenants total. KEYS: the totals.
# ARGV: the sorted set's and the hash's names around the tenant's name (2 + 2), now, the limit.
# Returns how many entries were pruned. The tenants' keys are named in the script: fine on the
# one Redis (not a cluster) Shoal runs on.
_SWEEP = redis_conn.script(
    LUA
    + """
local now, budget = tonumber(ARGV[5]), tonumber(ARGV[6])
local pruned, all = 0, 0
local flat = redis.call('HGETALL', KEYS[1])
for i = 1, #flat, 2 do
  local tenant = flat[i]
  if tenant ~= '*' then
    local zkey = ARGV[1] .. tenant .. ARGV[2]
    local hkey = ARGV[3] .. tenant .. ARGV[4]
    if redis.call('EXISTS', zkey) == 0 then
      redis.call('HDEL', KEYS[1], tenant)
    else
      if budget > pruned then
        pruned = pruned + prune(tenant, zkey, hkey, KEYS[1], now, budget - pruned)
      end
      all = all + (tonumber(redis.call('HGET', KEYS[1], tenant)) or 0)
    end
  end
end
if all > 0 then redis.call('HSET', KEYS[1], '*', all) else redis.call('HDEL', KEYS[1], '*') end
return pruned
"""
)


def _around_tenant(name: str) -> tuple[str, str]:
    before, _, after = name.partition("\0")
    return before, after


def sweep(r: redis.Redis, limit: int = SWEEP_LIMIT) -> int:
    """Prune every tenant's expired entries (at most `limit`) and recount the all-tenants
    total; beat runs it every few seconds. Returns how many entries were pruned."""
    args = [
        *_around_tenant(keys.tenant_storage("\0")),
        *_around_tenant(keys.tenant_storage_sizes("\0")),
        f"{time.time():.6f}",
        limit,
    ]
    return int(_SWEEP(keys=[keys.storage_totals()], args=args, client=r))


def held(r: redis.Redis, tenant: str) -> int:
    """The bytes `tenant` is counted for (expired entries not yet pruned included)."""
    return int(r.hget(keys.storage_totals(), tenant) or 0)


def held_by_all(r: redis.Redis) -> int:
    """The bytes all tenants together are counted for."""
    return int(r.hget(keys.storage_totals(), ALL) or 0)
