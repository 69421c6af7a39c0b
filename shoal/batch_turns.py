"""Batches take turns between tenants: one tenant's batches never hold every coordinator.

The batch worker runs SHOAL_BATCH_CONCURRENCY coordinators for all tenants. A coordinator first
takes a turn for its batch: a lease among the tenant's running batches (shoal/leases.py, at most
running_cap()). A batch over its tenant's cap does not hold the coordinator: it goes into the
tenant's waiting line in Redis and the coordinator takes the next batch from the queue, so
another tenant's batch runs while this tenant's wait. When one of the tenant's batches ends, it
queues the tenant's longest-waiting batches, as many as there is room for; the batch worker's
resume loop (workers/batch_runner.py resume_orphans) does the same every lease period, so a
batch whose waking was lost (a coordinator that died) still runs. The line lives in Redis, so a
waiting batch survives any worker.
"""

from __future__ import annotations

import time

import redis

from shoal import batches, keys, leases, queue
from shoal.context import Context
from shoal.records import BatchMeta
from shoal.settings import Settings


def running_cap(settings: Settings) -> int:
    """A tenant's batches running at once: SHOAL_BATCH_TENANT_RUNNING, kept below the
    coordinators so that one tenant never holds them all (unless there is only one)."""
    return max(1, min(settings.batch_tenant_running, settings.batch_concurrency - 1))


def take_turn(c: Context, meta: BatchMeta, lease_s: float) -> bool:
    """True if the batch may run now (its turn is held for `lease_s`; renew it); False if it
    waits in its tenant's line and the caller should let its coordinator go."""
    tenant, batch_id = meta["tenant"], meta["id"]
    if batches.cancel_requested(c.redis, batch_id):
        return True  # ending a cancelled batch's items takes no session and a moment
    turns, waiting = keys.batch_coordinators(tenant), keys.batches_waiting(tenant)
    cap = running_cap(c.settings)
    if leases.take(c.redis, turns, batch_id, cap, lease_s):
        c.redis.zrem(waiting, batch_id)
        return True
    c.redis.zadd(waiting, {batch_id: time.time()}, nx=True)
    # One of the tenant's batches may have ended between the take and the line, waking no one.
    if leases.take(c.redis, turns, batch_id, cap, lease_s):
        c.redis.zrem(waiting, batch_id)
        return True
    return False


def renew_turn(r: redis.Redis, meta: BatchMeta, lease_s: float) -> None:
    leases.renew(r, keys.batch_coordinators(meta["tenant"]), meta["id"], lease_s)


def end_turn(c: Context, meta: BatchMeta) -> None:
    """The batch's coordinator is done with it: give its turn to the tenant's next batch."""
    leases.release(c.redis, keys.batch_coordinators(meta["tenant"]), meta["id"])
    wake(c, meta["tenant"])


def wake(c: Context, tenant: str) -> list[str]:
    """Queue the tenant's longest-waiting batches, as many as it has room to run."""
    room = running_cap(c.settings) - leases.holders(c.redis, keys.batch_coordinators(tenant))
    if room <= 0:
        return []
    woken = [batch_id for batch_id, _ in c.redis.zpopmin(keys.batches_waiting(tenant), room)]
    for batch_id in woken:
        queue.RUN_BATCH.send(c.celery, batch_id=batch_id)
    return woken


def is_waiting(r: redis.Redis, meta: BatchMeta) -> bool:
    return r.zscore(keys.batches_waiting(meta["tenant"]), meta["id"]) is not None


def wake_cancelled(c: Context, meta: BatchMeta) -> None:
    """A cancelled batch in the line is queued at once: it only ends its items."""
    if c.redis.zrem(keys.batches_waiting(meta["tenant"]), meta["id"]):
        queue.RUN_BATCH.send(c.celery, batch_id=meta["id"])
