"""Idle expiry: beat's sweep over the sessions idle past their pool's cooldown, older than its
max lifetime, or asleep past its sleep retention.

A session idle past its cooldown in a pool whose `on_idle` is "sleep" is put to sleep instead
(its host saves its VM; shoal/use_cases/sessions.py); every other due session is expired through
the core's use case, which leaves a tombstone first and then asks the session's host to destroy
the VM (and its sleep image). A session with an execution in flight is skipped: its host touches
it again when the execution ends.
"""

from __future__ import annotations

import time

from shoal import keys, sessions
from shoal.context import Context
from shoal.errors import PoolNotFound
from shoal.pools import get_pool
from shoal.records import SessionEntry
from shoal.use_cases.sessions import expire_session, sleep_session

# A session asked to sleep is looked at again after this long if its host never did it.
SLEEP_RETRY_S = 60.0


def expire_idle(c: Context, now: float | None = None) -> list[str]:
    """Expire (or put to sleep) every session past a deadline that has no execution in flight;
    the ids of those expired."""
    now = time.time() if now is None else now
    r = c.redis
    expired = []
    for session_id in sessions.due_for_expiry(r, now):
        entry = sessions.load(r, session_id)
        if entry is None or entry["state"] not in sessions.LIVE_STATES:
            for key in (keys.session_deadlines(), keys.sleep_deadlines()):
                r.zrem(key, session_id)
            continue
        if r.zcard(keys.session_executions(session_id)):
            continue  # busy: its host will touch it again when the execution ends
        if _goes_to_sleep(c, entry, now):
            r.zadd(keys.session_deadlines(), {session_id: now + SLEEP_RETRY_S}, xx=True)
            sleep_session(c, entry)
            continue
        expire_session(c, entry)
        expired.append(session_id)
    return expired


def _goes_to_sleep(c: Context, entry: SessionEntry, now: float) -> bool:
    """An active session of a sleeping pool that is due only by its idle cooldown."""
    if entry["state"] != sessions.ACTIVE:
        return False
    try:
        if get_pool(c.settings, entry["pool"]).on_idle != "sleep":
            return False
    except PoolNotFound:
        return False
    lifetime_end = c.redis.zscore(keys.session_lifetimes(), entry["id"])
    return lifetime_end is None or lifetime_end > now
