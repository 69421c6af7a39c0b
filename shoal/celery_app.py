"""The Celery application: broker, queues, routes, beat schedule and reliability settings.

Each host's worker consumes its own queue (`shoal.host.<host>`): every task about a session goes
to the queue of the host that runs its VM. `shoal.control` is the default queue for tasks that
belong to no host, taken by whichever worker is free. Results travel through Shoal's own records
(shoal/executions.py) and reply lists (shoal/replies.py), so Celery's result backend is off.
"""

from __future__ import annotations

import math
from functools import lru_cache

from celery import Celery

from shoal import redis_conn
from shoal.settings import Settings

CONTROL_QUEUE = "shoal.control"


def make_celery(settings: Settings) -> Celery:
    target = redis_conn.target(settings)
    broker, broker_config = target.celery_broker()
    transport = broker_config.pop("broker_transport_options")
    app = Celery("shoal", broker=broker)
    app.conf.update(broker_config)
    if target.sentinel:
        # A publish that meets a dead primary is retried on a new connection, which goes to
        # whichever server is primary now (docs/security.md, "Redis").
        app.conf.task_publish_retry_policy = _failover_retry(settings)
    app.conf.update(
        # Our records carry results; skipping the backend saves a Redis round trip per task.
        task_ignore_result=True,
        # Early ack: an execution is not idempotent, so a task whose worker died must not be
        # redelivered and run again; the liveness check marks it `lost` instead.
        task_acks_late=False,
        # One message at a time per thread keeps a session's tasks in arrival order.
        worker_prefetch_multiplier=1,
        task_default_queue=CONTROL_QUEUE,
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        # Loopback Redis answers in well under a millisecond; don't let a dead one hang requests.
        # No ack emulation: with early acks it only bought the restore of messages a dead
        # worker had prefetched but not started, at two Redis round trips per task in the
        # worker's consumer. A dead host's sessions and executions are marked lost anyway
        # (shoal/liveness.py), and replenish and housekeeping run again from beat.
        broker_transport_options={
            "socket_timeout": 10,
            "socket_connect_timeout": 5,
            "ack_emulation": False,
            **transport,
        },
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_send_task_events=False,
        # Housekeeping runs inside beat itself (workers/beat.py), so there is no schedule.
        beat_schedule={},
        beat_schedule_filename=str(settings.run_dir / "celerybeat-schedule"),
    )
    return app


def _failover_retry(settings: Settings) -> dict:
    """Celery's default gives up after about a second; a failover takes longer."""
    step = redis_conn.FAILOVER_RETRY_STEP_S
    attempts = max(3, math.ceil(settings.redis_retry_s / step))
    return {"max_retries": attempts, "interval_start": 0, "interval_step": step,
            "interval_max": step}  # fmt: skip


@lru_cache(maxsize=1)
def celery_for(settings: Settings) -> Celery:
    return make_celery(settings)
