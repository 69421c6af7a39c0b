"""Celery beat's scheduler, with a heartbeat so /healthz can tell whether beat is alive."""

from __future__ import annotations

import time

from celery.beat import PersistentScheduler

from shoal import keys, redis_conn
from shoal.settings import load

BEAT_HEARTBEAT_TTL_S = 30


class ShoalScheduler(PersistentScheduler):
    """Run with `celery beat -S workers.beat:ShoalScheduler`."""

    max_interval = 5

    def setup_schedule(self) -> None:
        super().setup_schedule()
        self._redis = redis_conn.client(load())
        self._last_beat = 0.0

    def tick(self, *args, **kwargs) -> float:
        now = time.time()
        if now - self._last_beat >= 2:
            self._redis.set(keys.beat_heartbeat(), f"{now:.3f}", ex=BEAT_HEARTBEAT_TTL_S)
            self._last_beat = now
        return super().tick(*args, **kwargs)
