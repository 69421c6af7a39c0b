"""Celery beat's scheduler, with a heartbeat for /healthz and a lease so only one beat acts.

Two beats may be started (by mistake, or one per host for safety); each tick, a beat renews
or takes the lease in Redis, and only the holder sends the periodic tasks. When the holder dies,
another takes over once the lease runs out.
"""

from __future__ import annotations

import secrets
import time

from celery.beat import PersistentScheduler

from shoal import keys, redis_conn
from shoal.settings import load

BEAT_HEARTBEAT_TTL_S = 30
LEASE_S = 15
IDLE_TICK_S = 2.0


class ShoalScheduler(PersistentScheduler):
    """Run with `celery beat -S workers.beat:ShoalScheduler`."""

    max_interval = 5

    def setup_schedule(self) -> None:
        super().setup_schedule()
        self._redis = redis_conn.client(load())
        self._token = secrets.token_hex(8)

    def _hold_lease(self) -> bool:
        lock = keys.beat_lock()
        if self._redis.set(lock, self._token, nx=True, ex=LEASE_S):
            return True
        if self._redis.get(lock) == self._token:
            self._redis.expire(lock, LEASE_S)
            return True
        return False

    def tick(self, *args, **kwargs) -> float:
        self._redis.set(keys.beat_heartbeat(), f"{time.time():.3f}", ex=BEAT_HEARTBEAT_TTL_S)
        if not self._hold_lease():
            return IDLE_TICK_S
        return min(super().tick(*args, **kwargs), IDLE_TICK_S)
