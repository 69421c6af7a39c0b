"""Batches: store one and queue its coordinator, or cancel what has not finished.

The coordinator itself runs in the batch worker (workers/batch_runner.py) and drives each item
through the other use cases, exactly as a client would by hand.
"""

from __future__ import annotations

from shoal import batches, executions, queue
from shoal.context import Context
from shoal.pools import get_pool
from shoal.records import BatchMeta
from shoal.use_cases.executions import cancel_execution


def submit_batch(
    c: Context,
    tenant: str,
    pool: str,
    items: list,
    max_parallel: int,
    callback_url: str | None = None,
) -> BatchMeta:
    """Store the batch and queue its coordinator; return the batch's hash."""
    get_pool(c.settings, pool)
    meta = batches.create(c.settings, c.redis, tenant, pool, items, max_parallel, callback_url)
    queue.RUN_BATCH.send(c.celery, batch_id=meta["id"])
    return meta


def cancel_batch(c: Context, meta: BatchMeta) -> None:
    """Cancel what has not finished: pending items end when the runner reaches them, running
    executions are interrupted (they end `cancelled`)."""
    batches.request_cancel(c.redis, meta, c.settings.execution_ttl_s)
    for item in batches.load_items(c.redis, meta["id"]).values():
        if item["status"] != batches.RUNNING or not item.get("execution_id"):
            continue
        record = executions.load(c.redis, item["execution_id"])
        if record is not None:
            cancel_execution(c, record)
