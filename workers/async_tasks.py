"""Celery tasks of the asynchronous pipelines: webhook deliveries and batch coordinators.

They run in their own worker processes (workers/async_app.py, started by `shoal up` as the
`webhooks` and `batches` components), never in a host's worker: a slow receiver or a long batch
never takes a thread that an execution needs. Thin wrappers around shoal/webhooks.py and
workers/batch_runner.py, registered under the names declared in shoal/queue.py.
"""

from __future__ import annotations

import logging
import threading
from functools import lru_cache

from celery import shared_task
from celery.signals import worker_ready

from shoal import queue, webhooks
from shoal.celery_app import celery_for
from shoal.context import Context, make_context
from shoal.settings import load
from workers import batch_runner

log = logging.getLogger("shoal.async")

BATCH_WORKER_PREFIX = "batches-"


@lru_cache(maxsize=1)
def _context() -> Context:
    settings = load()
    return make_context(settings, celery_for(settings))


@shared_task(name=queue.DELIVER_WEBHOOK.name)
def deliver_webhook(*, owner_id: str) -> None:
    c = _context()
    webhooks.deliver(c.settings, c.redis, c.celery, owner_id)


@shared_task(name=queue.RUN_BATCH.name)
def run_batch(*, batch_id: str) -> None:
    batch_runner.BatchRunner(_context(), batch_id).run()


def _resume_loop() -> None:
    stop = threading.Event()
    while not stop.wait(batch_runner.LEASE_S):
        try:
            batch_runner.resume_orphans(_context())
        except Exception:
            log.exception("resuming orphaned batches failed")


@worker_ready.connect
def _start_resume_loop(sender=None, **_: object) -> None:
    """Only in the batch worker: look for batches whose coordinator died."""
    if sender is not None and str(sender.hostname).startswith(BATCH_WORKER_PREFIX):
        threading.Thread(target=_resume_loop, name="batch-resume", daemon=True).start()
