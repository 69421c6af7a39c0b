"""What every use case needs: settings, Redis clients and the Celery app, built once per process.

The API builds one per Flask app (api/app.py) and hangs it off the app; the asynchronous workers
and beat build one per process. Use cases take it as their first argument, so they never reach
for a global.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis
from celery import Celery

from shoal import redis_conn
from shoal.celery_app import make_celery
from shoal.settings import Settings


@dataclass
class Context:
    settings: Settings
    redis: redis.Redis
    redis_bin: redis.Redis  # bytes in and out, for file chunks
    celery: Celery


def make_context(settings: Settings, celery: Celery | None = None) -> Context:
    return Context(
        settings=settings,
        redis=redis_conn.client(settings),
        redis_bin=redis_conn.binary_client(settings),
        celery=celery or make_celery(settings),
    )
