"""Counted leases in Redis: at most `cap` holders of one key at a time.

A key is a sorted set of holders scored by the time their lease ends. Taking a lease first drops
the holders whose lease ran out, so a holder that died (its worker killed mid-attempt, its
coordinator gone) frees its place by itself after `lease_s`; a live holder renews before then.
Taking is one Lua script, so two takers at once can never both get the last place.

Used for the fair-share bounds of the asynchronous pipelines (docs/limits.md): a tenant's
webhook deliveries in flight, its batches holding a coordinator, its unfinished batches.
"""

from __future__ import annotations

import math
import time

import redis

# KEYS[1]: the holders; ARGV: member, cap, now, lease end, key expiry (s). 1 if taken (or
# already held: the lease is renewed), 0 if `cap` others hold it. Every holder of one key has
# the same lease length, so the newest lease always ends last and the key's expiry follows it.
_TAKE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
if not redis.call('ZSCORE', KEYS[1], ARGV[1])
    and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""


def take(r: redis.Redis, key: str, member: str, cap: int, lease_s: float) -> bool:
    """Hold a place under `key` for `lease_s` unless `cap` others hold one; True if held."""
    now = time.time()
    expiry = math.ceil(lease_s) + 1
    return bool(r.eval(_TAKE, 1, key, member, cap, now, now + lease_s, expiry))


def renew(r: redis.Redis, key: str, member: str, lease_s: float) -> None:
    """Push a held lease's end `lease_s` from now (a lease already lost stays lost)."""
    pipe = r.pipeline()
    pipe.zadd(key, {member: time.time() + lease_s}, xx=True)
    pipe.expire(key, math.ceil(lease_s) + 1)
    pipe.execute()


def release(r: redis.Redis, key: str, member: str) -> None:
    r.zrem(key, member)


def holders(r: redis.Redis, key: str) -> int:
    """How many leases under `key` are live now."""
    return r.zcount(key, time.time(), "+inf")


def holds(r: redis.Redis, key: str, member: str) -> bool:
    score = r.zscore(key, member)
    return score is not None and score > time.time()
