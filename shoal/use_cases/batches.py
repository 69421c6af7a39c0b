"""Batches: store one and queue its coordinator, or cancel what has not finished.

The coordinator itself runs in the batch worker (workers/batch_runner.py) and drives each item
through the other use cases, exactly as a client would by hand.
"""

from __future__ import annotations

from shoal import batch_turns, batches, executions, keys, leases, queue, sessions
from shoal.context import Context
from shoal.errors import TooManyBatches, ValidationFailed
from shoal.pools import get_pool
from shoal.records import BatchMeta
from shoal.use_cases.executions import cancel_execution
from shoal.use_cases.sessions import check_forkable


def submit_batch(
    c: Context,
    tenant: str,
    pool: str | None,
    items: list,
    max_parallel: int,
    callback_url: str | None = None,
    from_session: str | None = None,
) -> BatchMeta:
    """Store the batch and queue its coordinator; return the batch's hash. With
    `from_session` (a live session of the tenant), items run in forks of it, in its pool: the
    batch's `pool` must be that pool or left out.

    A tenant has at most SHOAL_TENANT_MAX_BATCHES unfinished batches: its place is taken
    atomically before anything is stored (TooManyBatches beyond it) and given back when the
    batch finishes, or when its records expire if it never does."""
    if from_session:
        parent = sessions.get_for_tenant(c.redis, tenant, from_session)
        if pool is not None and pool != parent["pool"]:
            raise ValidationFailed(
                f"pool: the batch runs in forks of {from_session}, a session of pool "
                f"{parent['pool']!r}; leave pool out or name that one"
            )
        check_forkable(c, parent)
        pool = parent["pool"]
    pool = pool or "default"
    get_pool(c.settings, pool)
    batch_id, cap = batches.new_id(), c.settings.tenant_max_batches
    unfinished = keys.tenant_batches(tenant)
    if not leases.take(c.redis, unfinished, batch_id, cap, c.settings.execution_ttl_s):
        raise TooManyBatches(
            f"tenant {tenant!r} already has {cap} unfinished batches, the most it may have "
            "(SHOAL_TENANT_MAX_BATCHES); wait for one to finish, or cancel one"
        )
    try:
        meta = batches.create(
            c.settings, c.redis, tenant, pool, items, max_parallel, callback_url, batch_id,
            from_session or "",
        )  # fmt: skip
    except BaseException:
        leases.release(c.redis, unfinished, batch_id)
        raise
    queue.RUN_BATCH.send(c.celery, batch_id=meta["id"])
    return meta


def cancel_batch(c: Context, meta: BatchMeta) -> None:
    """Cancel what has not finished: pending items end when the runner reaches them, running
    executions are interrupted (they end `cancelled`)."""
    batches.request_cancel(c.redis, meta, c.settings.execution_ttl_s)
    batch_turns.wake_cancelled(c, meta)
    for item in batches.load_items(c.redis, meta["id"]).values():
        if item["status"] != batches.RUNNING or not item.get("execution_id"):
            continue
        record = executions.load(c.redis, item["execution_id"])
        if record is not None:
            cancel_execution(c, record)
