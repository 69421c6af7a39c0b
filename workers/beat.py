"""Celery beat's scheduler: Shoal's housekeeping, a heartbeat for /healthz, and a lease so only
one beat acts.

Housekeeping runs in beat itself, not as tasks on a worker: it must go on when workers die
(marking a dead host's sessions lost is its whole point). Every HOUSEKEEPING_S it marks the
sessions of silent hosts lost (shoal/liveness.py), expires idle sessions (pool/expiry.py),
lets go of the bytes counted for tenants' expired records (shoal/storage.py) and asks every
live host to top its ready pools up (pool/ready.py).
Two beats may be started (by mistake, or one per host for safety); each tick, a beat renews or
takes the lease in Redis, and only the holder acts. When the holder dies, another takes over
once the lease runs out.
"""

from __future__ import annotations

import logging
import secrets
import time

from celery.beat import PersistentScheduler

from pool import expiry
from shoal import hosts, keys, liveness, queue, storage
from shoal.context import make_context
from shoal.settings import load

log = logging.getLogger("shoal.beat")

BEAT_HEARTBEAT_TTL_S = 30
LEASE_S = 15
IDLE_TICK_S = 2.0
HOUSEKEEPING_S = 5.0  # so a session idle past its cooldown is gone within ~10 s


class ShoalScheduler(PersistentScheduler):
    """Run with `celery beat -S workers.beat:ShoalScheduler`."""

    max_interval = 5

    def setup_schedule(self) -> None:
        super().setup_schedule()
        self._settings = load()
        self._context = make_context(self._settings, self.app)
        self._redis = self._context.redis
        self._token = secrets.token_hex(8)
        self._last_housekeeping = 0.0

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
        if time.monotonic() - self._last_housekeeping >= HOUSEKEEPING_S:
            self._last_housekeeping = time.monotonic()
            self.housekeeping()
        return min(super().tick(*args, **kwargs), IDLE_TICK_S)

    def housekeeping(self) -> None:
        try:
            liveness.check_hosts(self._redis, self._settings.execution_ttl_s)
            liveness.end_overdue(self._redis, self._settings)
            expiry.expire_idle(self._context)
            storage.sweep(self._redis)
            for host in hosts.live_hosts(self._redis):
                queue.REPLENISH.send(self.app, host=host, expires_s=HOUSEKEEPING_S)
        except Exception:
            log.exception("housekeeping failed; trying again in %.0f s", HOUSEKEEPING_S)
