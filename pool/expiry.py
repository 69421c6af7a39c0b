"""Idle expiry: beat's sweep over the sessions idle past their pool's cooldown (or older than
its max lifetime).

Each due session is expired through the core's use case (shoal/use_cases/sessions.py), which
leaves a tombstone first and then asks the session's host to destroy the VM. A session with an
execution in flight is skipped: its host touches it again when the execution ends.
"""

from __future__ import annotations

import time

from shoal import keys, sessions
from shoal.context import Context
from shoal.use_cases.sessions import expire_session


def expire_idle(c: Context, now: float | None = None) -> list[str]:
    """Expire every session past its idle deadline that has no execution in flight."""
    now = time.time() if now is None else now
    r = c.redis
    expired = []
    for session_id in sessions.due_for_expiry(r, now):
        entry = sessions.load(r, session_id)
        if entry is None or entry["state"] not in sessions.LIVE_STATES:
            r.zrem(keys.session_deadlines(), session_id)
            continue
        if r.zcard(keys.session_executions(session_id)):
            continue  # busy: its host will touch it again when the execution ends
        expire_session(c, entry)
        expired.append(session_id)
    return expired
