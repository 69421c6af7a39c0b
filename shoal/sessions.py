"""The session registry in Redis: which tenant owns a session, which host runs it, its state.

States: `creating` (its VM is being made), `active`, `sleeping` (its VM saved to its host's
disk, docs/api.md "Sleeping sessions"), `waking` (being restored from that), `lost` (its VM or
host died; kept so the client can read why), and tombstones `expired` / `deleted` kept a day so
a late request gets a precise 404.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import redis

from shoal import keys, redis_conn
from shoal.errors import PoolExhausted, SessionExpired, SessionNotFound, TenantSessionLimit
from shoal.pools import Pool
from shoal.records import SessionEntry
from shoal.timeutil import iso

CREATING, ACTIVE, LOST, EXPIRED, DELETED = "creating", "active", "lost", "expired", "deleted"
SLEEPING, WAKING = "sleeping", "waking"
LIVE_STATES = (CREATING, ACTIVE, LOST, SLEEPING, WAKING)
# The sessions whose VM, running or saved, its host keeps.
HELD_STATES = (CREATING, ACTIVE, SLEEPING, WAKING)
TOMBSTONE_TTL_S = 86400
# Forks one request may ask for (each is a session of its own, within the tenant's cap).
MAX_FORKS = 16


def new_id() -> str:
    return "ses_" + secrets.token_hex(10)


# Atomically: take a place within the tenant's and the pool's caps and register the session,
# so concurrent creates never exceed either. KEYS: the session, the tenant's and the pool's
# session sets, the host's, the idle deadlines, the lifetimes, the tenant's own cap. ARGV: the
# session id, the default tenant cap (-1: none), the pool's cap, the idle deadline, the end of
# its lifetime, then the entry's fields and values. Returns {'ok'}, or {'tenant'|'pool', cap}.
_CREATE = redis_conn.script("""
if ARGV[2] ~= '-1' then
  local cap = tonumber(redis.call('GET', KEYS[7])) or tonumber(ARGV[2])
  if redis.call('SCARD', KEYS[2]) >= cap then return {'tenant', cap} end
end
if redis.call('SCARD', KEYS[3]) >= tonumber(ARGV[3]) then return {'pool', tonumber(ARGV[3])} end
redis.call('HSET', KEYS[1], unpack(ARGV, 6))
redis.call('ZADD', KEYS[5], ARGV[4], ARGV[1])
redis.call('ZADD', KEYS[6], ARGV[5], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('SADD', KEYS[4], ARGV[1])
return {'ok'}
""")


def create(
    r: redis.Redis,
    tenant: str,
    pool: Pool,
    host: str,
    identifier: str = "",
    tenant_cap: int | None = None,
    forked_from: str = "",
) -> SessionEntry:
    """Register a new session (state `creating`) within the pool's max_sessions and, given
    `tenant_cap` (the default; the tenant's own cap wins), the tenant's cap: TenantSessionLimit
    or PoolExhausted, registering nothing, when one is full. Check and take are one step.
    `forked_from`: the session it is a fork of."""
    now = time.time()
    entry: SessionEntry = {
        "id": new_id(),
        "tenant": tenant,
        "pool": pool.name,
        "host": host,
        "state": CREATING,
        "identifier": identifier,
        "created_at": f"{now:.6f}",
        "last_used_at": f"{now:.6f}",
        "cooldown_s": str(pool.cooldown_s),
        "reason": "",
    }
    if forked_from:
        entry["forked_from"] = forked_from
    script_keys = [
        keys.session(entry["id"]),
        keys.tenant_sessions(tenant),
        keys.pool_sessions(pool.name),
        keys.host_sessions(host),
        keys.session_deadlines(),
        keys.session_lifetimes(),
        keys.tenant_max_sessions(tenant),
    ]
    args: list[str | int | float] = [
        entry["id"],
        -1 if tenant_cap is None else tenant_cap,
        pool.max_sessions,
        now + pool.cooldown_s,
        now + pool.max_lifetime_s,
    ]
    for name, value in entry.items():
        args += [name, value]
    answer = _CREATE(keys=script_keys, args=args, client=r)
    if answer[0] == "tenant":
        raise TenantSessionLimit(
            f"tenant {tenant!r} already has {answer[1]} live sessions "
            "(SHOAL_TENANT_MAX_SESSIONS, or its own cap); delete one first"
        )
    if answer[0] == "pool":
        raise PoolExhausted(
            f"pool {pool.name!r} is at its limit of {answer[1]} sessions (max_sessions)"
        )
    return entry


def load(r: redis.Redis, session_id: str) -> SessionEntry | None:
    entry = r.hgetall(keys.session(session_id))
    return entry or None


def get_for_tenant(r: redis.Redis, tenant: str, session_id: str) -> SessionEntry:
    """The live session `session_id` of `tenant`; another tenant's id is simply not found."""
    entry = load(r, session_id) if session_id.startswith("ses_") else None
    return owned_by(tenant, session_id, entry)


def owned_by(tenant: str, session_id: str, entry: SessionEntry | None) -> SessionEntry:
    """`entry` (the registry hash of `session_id`, None when absent) if it is a live session
    of `tenant`; the same errors as get_for_tenant otherwise."""
    if entry is None or entry["tenant"] != tenant:
        raise SessionNotFound(f"no session {session_id!r}")
    if entry["state"] == EXPIRED:
        raise SessionExpired(f"session {session_id!r} expired after being idle; its state is gone")
    if entry["state"] == DELETED:
        raise SessionNotFound(f"session {session_id!r} was deleted")
    return entry


def list_for_tenant(r: redis.Redis, tenant: str) -> list[SessionEntry]:
    ids = sorted(r.smembers(keys.tenant_sessions(tenant)))
    pipe = r.pipeline()
    for session_id in ids:
        pipe.hgetall(keys.session(session_id))
    return [e for e in pipe.execute() if e and e.get("state") in LIVE_STATES]


def count_for_pool(r: redis.Redis, pool: str) -> int:
    return r.scard(keys.pool_sessions(pool))


def count_for_tenant(r: redis.Redis, tenant: str) -> int:
    return r.scard(keys.tenant_sessions(tenant))


# Atomically: only a session still `creating` becomes active with its VM (ARGV: vm id, warm).
_ACTIVATE = """
if redis.call('HGET', KEYS[1], 'state') ~= 'creating' then return 0 end
redis.call('HSET', KEYS[1], 'vm', ARGV[1], 'state', 'active', 'warm', ARGV[2])
return 1
"""


def activate(r: redis.Redis, session_id: str, vm_id: str, warm: bool) -> bool:
    """Record the session's VM and make it active; False, changing nothing, when the session
    ended (its creator gave up, or it was deleted) while the VM was being made."""
    return bool(r.eval(_ACTIVATE, 1, keys.session(session_id), vm_id, "1" if warm else "0"))


# Atomically: only a session still creating or active is marked lost (ARGV: the reason); an
# ended one keeps its tombstone.
_MARK_LOST = """
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'creating' and state ~= 'active' and state ~= 'sleeping' and state ~= 'waking' then
  return 0
end
redis.call('HSET', KEYS[1], 'state', 'lost', 'reason', ARGV[1])
return 1
"""


def mark_lost(r: redis.Redis, session_id: str, reason: str) -> bool:
    """Mark a live session lost, saying why; False when it had already ended (deleted,
    expired) or was lost before."""
    return bool(r.eval(_MARK_LOST, 1, keys.session(session_id), reason))


def set_state(r: redis.Redis, session_id: str, state: str, reason: str = "") -> None:
    r.hset(keys.session(session_id), mapping={"state": state, "reason": reason})


def touch(r: redis.Redis | redis.client.Pipeline, session_id: str, cooldown_s: int) -> None:
    """Record a use of the session: its idle cooldown starts again."""
    now = time.time()
    r.hset(keys.session(session_id), "last_used_at", f"{now:.6f}")
    r.zadd(keys.session_deadlines(), {session_id: now + cooldown_s}, xx=True)


def due_for_expiry(r: redis.Redis, now: float, limit: int = 500) -> list[str]:
    """Sessions idle past their cooldown, older than their pool's max lifetime, or asleep past
    its sleep retention."""
    due = set()
    for key in (keys.session_deadlines(), keys.session_lifetimes(), keys.sleep_deadlines()):
        due.update(r.zrangebyscore(key, "-inf", now, start=0, num=limit))
    return sorted(due)


# Atomically: an active session becomes sleeping; its idle and lifetime clocks stop (what is
# left of its lifetime is kept), its retention clock starts. KEYS: the session, the idle
# deadlines, the lifetimes, the sleep deadlines. ARGV: the session id, now, the end of its
# retention, the image's size.
_ASLEEP = """
if redis.call('HGET', KEYS[1], 'state') ~= 'active' then return 0 end
local lifetime_end = tonumber(redis.call('ZSCORE', KEYS[3], ARGV[1]))
if lifetime_end then
  redis.call('HSET', KEYS[1], 'lifetime_left', tostring(lifetime_end - tonumber(ARGV[2])))
end
redis.call('HSET', KEYS[1], 'state', 'sleeping', 'slept_at', ARGV[2],
           'sleep_expires_at', ARGV[3], 'sleep_bytes', ARGV[4])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[1])
redis.call('ZADD', KEYS[5], ARGV[2], ARGV[1])
return 1
"""

# Atomically: a sleeping session is being restored; its retention does not end it meanwhile.
# KEYS as _ASLEEP's; ARGV: the session id.
_WAKING = """
if redis.call('HGET', KEYS[1], 'state') ~= 'sleeping' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'waking')
redis.call('ZREM', KEYS[4], ARGV[1])
return 1
"""

# Atomically: a wake that failed leaves the session asleep as it was (its image is kept).
_BACK_TO_SLEEP = """
if redis.call('HGET', KEYS[1], 'state') ~= 'waking' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'sleeping')
local retention_end = redis.call('HGET', KEYS[1], 'sleep_expires_at')
if retention_end then redis.call('ZADD', KEYS[4], retention_end, ARGV[1]) end
return 1
"""

# ... and, once restored, runs again: its idle clock restarts, its lifetime goes on from what
# was left of it, its retention clock stops. (`active`: its host saved it but could not record
# so.) KEYS as _ASLEEP's. ARGV: the session id, now, the idle deadline, a whole lifetime.
_AWAKE = """
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'waking' and state ~= 'sleeping' and state ~= 'active' then return 0 end
local left = tonumber(redis.call('HGET', KEYS[1], 'lifetime_left')) or tonumber(ARGV[4])
local slept_at = tonumber(redis.call('HGET', KEYS[1], 'slept_at'))
if slept_at then
  redis.call('HINCRBYFLOAT', KEYS[1], 'slept_s', tostring(tonumber(ARGV[2]) - slept_at))
end
redis.call('HSET', KEYS[1], 'state', 'active', 'last_used_at', ARGV[2])
redis.call('HDEL', KEYS[1], 'slept_at', 'sleep_expires_at', 'sleep_bytes', 'lifetime_left')
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('ZREM', KEYS[5], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
redis.call('ZADD', KEYS[3], tonumber(ARGV[2]) + left, ARGV[1])
return 1
"""


def _clock_keys(session_id: str, tenant: str = "") -> list[str]:
    return [
        keys.session(session_id),
        keys.session_deadlines(),
        keys.session_lifetimes(),
        keys.sleep_deadlines(),
        keys.tenant_sleepers(tenant),
    ]


def asleep(
    r: redis.Redis, session_id: str, tenant: str, retention_s: int, image_bytes: int
) -> bool:
    """Record that the session's VM is saved (its image complete on disk); False, changing
    nothing, when the session was not active (deleted or lost meanwhile)."""
    now = time.time()
    args = [session_id, f"{now:.6f}", f"{now + retention_s:.6f}", image_bytes]
    return bool(r.eval(_ASLEEP, 5, *_clock_keys(session_id, tenant), *args))


def sleepers(r: redis.Redis, tenant: str) -> list[tuple[str, int]]:
    """The tenant's sleeping sessions, oldest asleep first, with the bytes of their images."""
    ids = r.zrange(keys.tenant_sleepers(tenant), 0, -1)
    pipe = r.pipeline()
    for session_id in ids:
        pipe.hmget(keys.session(session_id), "state", "sleep_bytes")
    return [
        (session_id, int(size or 0))
        for session_id, (state, size) in zip(ids, pipe.execute(), strict=True)
        if state == SLEEPING
    ]


def set_waking(r: redis.Redis, session_id: str) -> bool:
    """A sleeping session is being restored; False when it was not sleeping."""
    return bool(r.eval(_WAKING, 5, *_clock_keys(session_id), session_id))


def back_to_sleep(r: redis.Redis, session_id: str) -> bool:
    """A wake failed: the session sleeps on, its retention clock running again; False when it
    was not waking (it ended meanwhile)."""
    return bool(r.eval(_BACK_TO_SLEEP, 5, *_clock_keys(session_id), session_id))


def awake(r: redis.Redis, session_id: str, pool: Pool) -> bool:
    """The session runs again; False, changing nothing, when it ended meanwhile."""
    now = time.time()
    tenant = r.hget(keys.session(session_id), "tenant") or ""
    args = [session_id, f"{now:.6f}", now + pool.cooldown_s, pool.max_lifetime_s]
    return bool(r.eval(_AWAKE, 5, *_clock_keys(session_id, tenant), *args))


def end(r: redis.Redis, entry: SessionEntry, state: str) -> None:
    """Leave a tombstone (`expired` or `deleted`) and drop the session from every index."""
    session_id = entry["id"]
    current = r.hgetall(keys.session(session_id))
    if current.get("state") not in LIVE_STATES:
        return  # already ended: every step below has been done
    awake, asleep = _metered(current or entry, time.time())
    pipe = r.pipeline()
    pipe.hincrbyfloat(keys.usage(entry["tenant"]), entry["pool"], round(awake, 3))
    if asleep:
        sleeping_field = entry["pool"] + SLEEPING_SUFFIX
        pipe.hincrbyfloat(keys.usage(entry["tenant"]), sleeping_field, round(asleep, 3))
    pipe.hset(keys.session(session_id), mapping={"state": state})
    pipe.expire(keys.session(session_id), TOMBSTONE_TTL_S)
    pipe.zrem(keys.session_deadlines(), session_id)
    pipe.zrem(keys.session_lifetimes(), session_id)
    pipe.zrem(keys.sleep_deadlines(), session_id)
    pipe.zrem(keys.tenant_sleepers(entry["tenant"]), session_id)
    pipe.srem(keys.pool_sessions(entry["pool"]), session_id)
    pipe.srem(keys.tenant_sessions(entry["tenant"]), session_id)
    pipe.srem(keys.host_sessions(entry["host"]), session_id)
    pipe.delete(keys.session_seq(session_id))
    if entry.get("identifier"):
        ident_key = keys.identifier(entry["tenant"], entry["pool"], entry["identifier"])
        pipe.delete(ident_key)
    pipe.execute()


# The usage hash's field of a pool's sleeping seconds: `<pool>` + this (a pool name has no `|`).
SLEEPING_SUFFIX = "|sleeping"
_USAGE_ROW = {"session_seconds": 0.0, "sleeping_seconds": 0.0, "live_sessions": 0,
              "sleeping_sessions": 0}  # fmt: skip


def _metered(entry: SessionEntry, now: float) -> tuple[float, float]:
    """(seconds awake, seconds asleep) of a session from its creation to `now`."""
    asleep = float(entry.get("slept_s") or 0)
    if entry.get("state") in (SLEEPING, WAKING) and entry.get("slept_at"):
        asleep += max(now - float(entry["slept_at"]), 0.0)
    total = max(now - float(entry["created_at"]), 0.0)
    return max(total - asleep, 0.0), asleep


def usage(r: redis.Redis, tenant: str) -> dict[str, dict[str, float | int]]:
    """Per pool: session-seconds awake and asleep, of ended sessions plus the live ones so far,
    and the live and sleeping sessions now."""
    report: dict[str, dict[str, float | int]] = {}
    for field_name, seconds in r.hgetall(keys.usage(tenant)).items():
        pool, asleep_field, _rest = field_name.partition(SLEEPING_SUFFIX)
        row = report.setdefault(pool, dict(_USAGE_ROW))
        row["sleeping_seconds" if asleep_field else "session_seconds"] += float(seconds)
    now = time.time()
    for entry in list_for_tenant(r, tenant):
        row = report.setdefault(entry["pool"], dict(_USAGE_ROW))
        awake, asleep = _metered(entry, now)
        row["session_seconds"] += awake
        row["sleeping_seconds"] += asleep
        row["live_sessions"] += 1
        row["sleeping_sessions"] += int(entry["state"] in (SLEEPING, WAKING))
    for row in report.values():
        row["session_seconds"] = round(row["session_seconds"], 1)
        row["sleeping_seconds"] = round(row["sleeping_seconds"], 1)
    return report


def host_session_ids(r: redis.Redis, host: str) -> set[str]:
    return set(r.smembers(keys.host_sessions(host)))


def public_view(entry: SessionEntry) -> dict[str, Any]:
    """The session object of the native API."""
    view: dict[str, Any] = {
        "id": entry["id"],
        "pool": entry["pool"],
        "host": entry["host"],
        "state": entry["state"],
        "created_at": iso(float(entry["created_at"])),
        "last_used_at": iso(float(entry["last_used_at"])),
        "expires_at": iso(expires_at(entry)),
        "identifier": entry.get("identifier") or None,
    }
    if entry.get("forked_from"):
        view["forked_from"] = entry["forked_from"]
    if entry["state"] == LOST:
        view["reason"] = entry.get("reason", "")
    if entry["state"] in (SLEEPING, WAKING) and entry.get("sleep_expires_at"):
        view["slept_at"] = iso(float(entry["slept_at"]))
        view["sleep_expires_at"] = view["expires_at"]
    return view


def expires_at(entry: SessionEntry) -> float:
    """When the session ends unless used: its idle cooldown's end, or, asleep, its retention's."""
    if entry.get("state") in (SLEEPING, WAKING) and entry.get("sleep_expires_at"):
        return float(entry["sleep_expires_at"])
    return float(entry["last_used_at"]) + int(entry.get("cooldown_s") or 300)
