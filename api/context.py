"""What every request needs, built once per app: settings, a Redis client, the Celery app."""

from __future__ import annotations

from dataclasses import dataclass

import redis
from celery import Celery
from flask import current_app

from shoal.settings import Settings


@dataclass
class Context:
    settings: Settings
    redis: redis.Redis
    redis_bin: redis.Redis  # bytes in and out, for file chunks
    celery: Celery


def ctx() -> Context:
    return current_app.extensions["shoal"]
