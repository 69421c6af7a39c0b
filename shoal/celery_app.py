"""The Celery application: broker, queues, routes, beat schedule and reliability settings.

Each host's worker consumes its own queue (`shoal.host.<host>`): every task about a session goes
to the queue of the host that runs its VM. `shoal.control` is the default queue for tasks that
belong to no host, taken by whichever worker is free. Results travel through Shoal's own records
(shoal/executions.py) and reply lists (shoal/replies.py), so Celery's result backend is off.
"""

from __future__ import annotations

from functools import lru_cache

from celery import Celery

from shoal import redis_conn
from shoal.settings import Settings

CONTROL_QUEUE = "shoal.control"


def make_celery(settings: Settings) -> Celery:
    app = Celery("shoal", broker=redis_conn.redis_url(settings))
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
        },
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_send_task_events=False,
        # Housekeeping runs inside beat itself (workers/beat.py), so there is no schedule.
        beat_schedule={},
        beat_schedule_filename=str(settings.run_dir / "celerybeat-schedule"),
    )
    return app


@lru_cache(maxsize=1)
def celery_for(settings: Settings) -> Celery:
    return make_celery(settings)
