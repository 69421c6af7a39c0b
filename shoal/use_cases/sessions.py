"""Sessions: create one on a host, delete or expire it, and find the session behind a
dynamic-sessions identifier."""

from __future__ import annotations

import logging
import time

from shoal import keys, metrics, queue, replies, sessions
from shoal.context import Context
from shoal.errors import (
    HostTimeout,
    SessionBusy,
    SessionLost,
    SessionNotFound,
    SleepingHostDown,
    SleepNotEnabled,
)
from shoal.placement import choose_host
from shoal.pools import get_pool
from shoal.records import SessionEntry

log = logging.getLogger("shoal.sessions")

# A dynamic-sessions identifier's session is made under this lock; a crashed maker's lock lapses.
IDENT_LOCK_S = 300
IDENT_POLL_S = 0.05
IDENT_MARGIN_S = 3600


def create_session(c: Context, tenant: str, pool_name: str, identifier: str = "") -> SessionEntry:
    """Place a new session on a host and wait until its VM is ready. Its place within the
    tenant's and the pool's caps is taken at once (TenantSessionLimit, PoolExhausted) and given
    back if the session is not made."""
    pool = get_pool(c.settings, pool_name)
    host = choose_host(c.redis, pool)
    entry = sessions.create(
        c.redis, tenant, pool, host, identifier, tenant_cap=c.settings.tenant_max_sessions
    )
    reply_key = replies.new_key()
    timeout = queue.create_wait_s(c.settings)
    try:
        queue.CREATE_SESSION.send(
            c.celery,
            host=host,
            expires_s=timeout,
            session_id=entry["id"],
            pool_name=pool.name,
            reply_key=reply_key,
        )
        replies.wait(c.redis, reply_key, timeout)
    except Exception:
        # The host may yet give it a VM: the tombstone makes it destroy that VM at once.
        _end(c, entry, sessions.DELETED)
        raise
    entry["state"] = sessions.ACTIVE
    return entry


def fork_session(
    c: Context, tenant: str, entry: SessionEntry, count: int, reuse: bool = False
) -> list[SessionEntry]:
    """`count` new sessions whose interpreter state and files are the session's at one instant
    (docs/api.md "Forks"), on its host, each within the tenant's and the pool's caps; the
    session runs on. All or none: a failure ends the forks already registered. `reuse` (batches
    from a session): a capture of an earlier fork serves if the session ran nothing since."""
    check_forkable(c, entry)
    pool = get_pool(c.settings, entry["pool"])
    forks: list[SessionEntry] = []
    try:
        for _ in range(count):
            forks.append(
                sessions.create(
                    c.redis,
                    tenant,
                    pool,
                    entry["host"],
                    forked_from=entry["id"],
                    tenant_cap=c.settings.tenant_max_sessions,
                )  # fmt: skip
            )
        reply_key = replies.new_key()
        timeout = queue.fork_wait_s(c.settings, count)
        queue.FORK_SESSION.send(
            c.celery,
            host=entry["host"],
            expires_s=timeout,
            session_id=entry["id"],
            pool_name=pool.name,
            fork_ids=[fork["id"] for fork in forks],
            reply_key=reply_key,
            reuse=reuse,
        )
        replies.wait(c.redis, reply_key, timeout)
    except Exception:
        for fork in forks:  # a fork its host starts after all is destroyed at once
            _end(c, fork, sessions.DELETED)
        raise
    for fork in forks:
        fork["state"] = sessions.ACTIVE
    log.info("session=%s forked %d time(s): %s", entry["id"], count, [f["id"] for f in forks])
    return forks


def delete_session(c: Context, entry: SessionEntry) -> None:
    """End the session now (a tombstone answers later requests) and free its VM."""
    _end(c, entry, sessions.DELETED)


def expire_session(c: Context, entry: SessionEntry) -> None:
    """End a session that idled past its pool's cooldown. The tombstone comes first, so the
    API answers SessionExpired at once; a crash before the host destroys the VM leaves a domain
    that the host's reconcile destroys, since the registry no longer knows it."""
    _end(c, entry, sessions.EXPIRED)
    metrics.incr(c.redis, "shoal_session_expiries_total", pool=entry["pool"])
    log.info("session=%s host=%s expired after idling", entry["id"], entry["host"])


def sleep_session(c: Context, entry: SessionEntry) -> SessionEntry:
    """Ask the session's host to save its VM to disk; the session reads `sleeping` once the
    image is complete. Already asleep (or being made): nothing to do. Only a pool that sleeps
    (on_idle = "sleep") keeps sleeping sessions: their images hold the host's disk for days."""
    check_reachable(c, entry)
    pool = get_pool(c.settings, entry["pool"])
    if pool.on_idle != "sleep":
        raise SleepNotEnabled(
            f"pool {pool.name!r} does not keep sleeping sessions (its on_idle is "
            f'{pool.on_idle!r}); use a pool with on_idle = "sleep"'
        )
    if entry["state"] == sessions.ACTIVE:
        queue.SLEEP_SESSION.send(
            c.celery, host=entry["host"], session_id=entry["id"], pool_name=entry["pool"]
        )
    return entry


def wake_session(c: Context, entry: SessionEntry) -> SessionEntry:
    """Ask the session's host to wake its VM ahead of the next request (which would wake it
    anyway); the session reads `active` once it runs."""
    check_reachable(c, entry)
    if entry["state"] == sessions.SLEEPING:
        queue.WAKE_SESSION.send(
            c.celery, host=entry["host"], session_id=entry["id"], pool_name=entry["pool"]
        )
    return entry


def check_forkable(c: Context, entry: SessionEntry) -> None:
    """check_reachable, and SessionBusy for a session still being made (nothing to copy yet)."""
    check_reachable(c, entry)
    if entry["state"] == sessions.CREATING:
        raise SessionBusy(f"session {entry['id']} is still being made; fork it once it runs")


def check_reachable(c: Context, entry: SessionEntry) -> None:
    """SessionLost for a lost session; SleepingHostDown (503, Retry-After) for a sleeping one
    whose host is not answering: it lives on that host's disk and is kept until it is back."""
    if entry["state"] == sessions.LOST:
        raise SessionLost(
            f"session {entry['id']} was lost ({entry.get('reason') or 'its VM died'}); "
            "create a new session"
        )
    asleep = entry["state"] in (sessions.SLEEPING, sessions.WAKING)
    if asleep and not c.redis.exists(keys.host_heartbeat(entry["host"])):
        raise SleepingHostDown(
            f"session {entry['id']} sleeps on host {entry['host']}, which is not answering; "
            "it is kept: retry once the host is back"
        )


def _end(c: Context, entry: SessionEntry, state: str) -> None:
    sessions.end(c.redis, entry, state)
    queue.DESTROY_SESSION.send(c.celery, host=entry["host"], session_id=entry["id"])


def session_for_identifier(
    c: Context, tenant: str, pool_name: str, identifier: str, create: bool = True
) -> SessionEntry:
    """The live session behind `identifier` (per tenant and pool); made on first use, and made
    afresh once the old one expired, was deleted or was lost."""
    pool = get_pool(c.settings, pool_name)
    ident_key = keys.identifier(tenant, pool_name, identifier)
    deadline = time.monotonic() + queue.create_wait_s(c.settings)
    while True:
        session_id = c.redis.get(ident_key)
        entry = sessions.load(c.redis, session_id) if session_id else None
        if entry and entry["state"] in sessions.HELD_STATES:
            return entry  # a sleeping one is woken by the request that follows
        if not create:
            raise SessionNotFound(f"no session with identifier {identifier!r}")
        lock = ident_key + ":lock"
        if c.redis.set(lock, "1", nx=True, ex=IDENT_LOCK_S):
            try:
                if entry is not None:
                    delete_session(c, entry)
                entry = create_session(c, tenant, pool_name, identifier)
                # Deleted when the session ends; its TTL outlasts the longest a session lives,
                # so a key whose session ended without a word is not kept for ever.
                c.redis.set(ident_key, entry["id"], ex=pool.max_lifetime_s + IDENT_MARGIN_S)
                return entry
            finally:
                c.redis.delete(lock)
        if time.monotonic() > deadline:
            raise HostTimeout(f"the session for identifier {identifier!r} is still being made")
        time.sleep(IDENT_POLL_S)
