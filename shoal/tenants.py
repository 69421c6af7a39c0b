"""Tenants, their API keys and their own limits. Keys are stored only as SHA-256 hashes.

A tenant's limits (docs/limits.md, "Tenants") default to SHOAL_* settings; `shoal keys
max-sessions` and `shoal keys limits` give one tenant its own.
"""

from __future__ import annotations

import hashlib
import math
import re
import secrets
import time
from collections.abc import Callable

import redis

from shoal import keys, redis_conn
from shoal.errors import RateLimited, ValidationFailed
from shoal.settings import Settings

KEY_PREFIX = "shoal_"
TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def create_key(r: redis.Redis, tenant: str) -> tuple[str, str]:
    """Make a new key for `tenant` (created on first use); return (key_id, key). The key is
    shown once: only its hash is kept."""
    if not TENANT_NAME.match(tenant):
        raise ValidationFailed(
            "tenant names are 1-63 characters: letters, digits, '_', '.', '-'; "
            "starting with a letter or digit"
        )
    key_id = "key_" + secrets.token_hex(6)
    api_key = KEY_PREFIX + secrets.token_urlsafe(32)
    digest = hash_key(api_key)
    pipe = r.pipeline()
    pipe.hset(
        keys.api_key(digest),
        mapping={"key_id": key_id, "tenant": tenant, "created_at": f"{time.time():.3f}"},
    )
    pipe.hset(keys.api_key_ids(), key_id, digest)
    pipe.sadd(keys.tenants(), tenant)
    pipe.execute()
    return key_id, api_key


def _well_formed(api_key: str) -> bool:
    """A key of ours can be looked up; anything else is refused without a Redis call."""
    return api_key.startswith(KEY_PREFIX) and len(api_key) <= 200


def authenticate(r: redis.Redis, api_key: str) -> str | None:
    """The tenant owning `api_key`, or None."""
    if not _well_formed(api_key):
        return None
    return r.hget(keys.api_key(hash_key(api_key)), "tenant")


def _around_tenant(key_of_tenant: Callable[[str], str]) -> tuple[str, str]:
    """The key name `key_of_tenant` makes, as the text before and after the tenant's name: for
    a script that learns the tenant only as it runs."""
    before, _, after = key_of_tenant("\0").partition("\0")
    return before, after


# Who sends the request, its session (read before its owner is known: the caller checks the
# owner) and a token from the tenant's bucket, in one round trip. KEYS[1]: the API key's hash;
# KEYS[2], when given: the session. ARGV: the bucket's and the limits' key names around the
# tenant's name (2 + 2), the default rate and burst. Returns {} for an unknown key, else
# {tenant, ms until a token is there (0: taken), rate, burst, the session as a flat list}.
# The bucket's and the limits' keys are named in the script, not in KEYS: fine on the one
# Redis (not a cluster) that Shoal runs on.
_AUTHENTICATE = redis_conn.script("""
local tenant = redis.call('HGET', KEYS[1], 'tenant')
if not tenant then return {} end
local entry = {}
if #KEYS > 1 then entry = redis.call('HGETALL', KEYS[2]) end
local own = redis.call('HMGET', ARGV[3] .. tenant .. ARGV[4], 'rate', 'burst')
local rate, burst = tonumber(own[1]), tonumber(own[2])
if not rate or rate <= 0 then rate = tonumber(ARGV[5]) end
if not burst or burst < 1 then burst = tonumber(ARGV[6]) end
local bucket = ARGV[1] .. tenant .. ARGV[2]
local time = redis.call('TIME')
local now_ms = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local state = redis.call('HMGET', bucket, 'tokens', 'at_ms')
local tokens = tonumber(state[1]) or burst
local elapsed_ms = math.max(now_ms - (tonumber(state[2]) or now_ms), 0)
tokens = math.min(burst, tokens + elapsed_ms * rate / 1000)
local wait_ms = 0
if tokens >= 1 then tokens = tokens - 1 else wait_ms = math.ceil((1 - tokens) * 1000 / rate) end
redis.call('HSET', bucket, 'tokens', tostring(tokens), 'at_ms', tostring(now_ms))
redis.call('PEXPIRE', bucket, math.ceil(burst * 1000 / rate) + 1000)
return {tenant, wait_ms, tostring(rate), tostring(burst), entry}
""")
_BUCKET_KEY = _around_tenant(keys.tenant_bucket)
_LIMITS_KEY = _around_tenant(keys.tenant_limits)


def authenticate_request(
    r: redis.Redis, api_key: str, settings: Settings, session_key: str = ""
) -> tuple[str | None, dict[str, str]]:
    """The tenant owning `api_key` (None for a key that is not valid) and the hash at
    `session_key` ({} when absent or not asked for), in one round trip that also takes one
    token from the tenant's request bucket: RateLimited when it is empty."""
    if not _well_formed(api_key):
        return None, {}
    script_keys = [keys.api_key(hash_key(api_key))] + ([session_key] if session_key else [])
    args = [*_BUCKET_KEY, *_LIMITS_KEY, settings.tenant_rate, settings.tenant_burst]
    answer = _AUTHENTICATE(keys=script_keys, args=args, client=r)
    if not answer:
        return None, {}
    tenant, wait_ms, rate, burst, flat = answer
    if wait_ms:
        raise RateLimited(
            f"tenant {tenant!r} is over its request rate ({float(rate):g}/s, bursts of "
            f"{float(burst):g}; SHOAL_TENANT_RATE and SHOAL_TENANT_BURST, or its own); "
            "retry after the Retry-After seconds",
            retry_after_s=math.ceil(int(wait_ms) / 1000),
        )
    return tenant, dict(zip(flat[::2], flat[1::2], strict=True))


def list_keys(r: redis.Redis) -> list[dict[str, str]]:
    rows = []
    for _key_id, digest in sorted(r.hgetall(keys.api_key_ids()).items()):
        entry = r.hgetall(keys.api_key(digest))
        if entry:
            rows.append(entry)
    return rows


def revoke(r: redis.Redis, key_id: str) -> bool:
    digest = r.hget(keys.api_key_ids(), key_id)
    if digest is None:
        return False
    pipe = r.pipeline()
    pipe.delete(keys.api_key(digest))
    pipe.hdel(keys.api_key_ids(), key_id)
    pipe.execute()
    return True


def max_sessions(r: redis.Redis, tenant: str, default: int) -> int:
    """The tenant's session cap: its own (`shoal keys max-sessions`) or the instance default."""
    own = r.get(keys.tenant_max_sessions(tenant))
    return int(own) if own else default


def set_max_sessions(r: redis.Redis, tenant: str, limit: int | None) -> None:
    """Give `tenant` its own session cap; None goes back to SHOAL_TENANT_MAX_SESSIONS."""
    if limit is None:
        r.delete(keys.tenant_max_sessions(tenant))
    else:
        r.set(keys.tenant_max_sessions(tenant), str(int(limit)))


# A tenant's own limits (`shoal keys limits`): name -> the setting it overrides. Only `rate`
# (requests per second) may be a fraction.
LIMITS = {
    "rate": "tenant_rate",
    "burst": "tenant_burst",
    "max_waits": "tenant_max_waits",
    "max_pending": "tenant_max_pending",
    "max_session_pending": "session_max_pending",
    "max_redis_mib": "tenant_max_redis_mib",
}


def _number(name: str, raw: str | float) -> float | int:
    return float(raw) if name == "rate" else int(float(raw))


def limits(r: redis.Redis, tenant: str, settings: Settings) -> dict[str, float | int]:
    """The limits that apply to `tenant`: its own where it has one, else the settings'; with
    its session cap as `max_sessions`."""
    own = r.hgetall(keys.tenant_limits(tenant))
    found = {
        name: _number(name, own[name] if name in own else getattr(settings, setting))
        for name, setting in LIMITS.items()
    }
    found["max_sessions"] = max_sessions(r, tenant, settings.tenant_max_sessions)
    return found


def set_limits(r: redis.Redis, tenant: str, **values: float | None) -> None:
    """Give `tenant` its own limits (names from LIMITS); None or 0 goes back to the setting."""
    for name, value in values.items():
        if name not in LIMITS:
            raise ValidationFailed(f"no tenant limit {name!r}; one of {', '.join(LIMITS)}")
        if value is not None and (value < 0 or _number(name, value) != value):
            kind = "number" if name == "rate" else "whole number"
            raise ValidationFailed(f"`{name}` must be a positive {kind} (0: the default)")
    pipe = r.pipeline()
    for name, value in values.items():
        if value:
            pipe.hset(keys.tenant_limits(tenant), name, str(_number(name, value)))
        else:
            pipe.hdel(keys.tenant_limits(tenant), name)
    pipe.execute()
