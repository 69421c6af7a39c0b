"""Idle expiry: beat destroys sessions idle past their pool's cooldown.

Every step is idempotent: the registry entry becomes an `expired` tombstone first (so the API
answers SessionExpired at once and a dynamic-sessions identifier gets a fresh session), then the
session's host is asked to destroy the VM. A crash in between leaves a domain that the host's
reconcile destroys, since the registry no longer knows it.
"""

from __future__ import annotations

import logging
import time

import redis
from celery import Celery

from shoal import keys, metrics, sessions

log = logging.getLogger("shoal.expiry")

DESTROY_TASK_EXPIRY_S = 600


def expire_idle(r: redis.Redis, celery: Celery, now: float | None = None) -> list[str]:
    """Expire every session past its idle deadline that has no execution in flight."""
    now = time.time() if now is None else now
    expired = []
    for session_id in sessions.due_for_expiry(r, now):
        entry = sessions.load(r, session_id)
        if entry is None or entry["state"] not in sessions.LIVE_STATES:
            r.zrem(keys.session_deadlines(), session_id)
            continue
        if r.zcard(keys.session_executions(session_id)):
            continue  # busy: its host will touch it again when the execution ends
        sessions.end(r, entry, sessions.EXPIRED)
        metrics.incr(r, "shoal_session_expiries_total", pool=entry["pool"])
        celery.send_task(
            "shoal.destroy_session",
            args=[session_id],
            queue=keys.host_queue(entry["host"]),
            expires=DESTROY_TASK_EXPIRY_S,
        )
        log.info("session=%s host=%s expired after idling", session_id, entry["host"])
        expired.append(session_id)
    return expired
