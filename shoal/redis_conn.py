"""Which Redis this instance uses, and clients for it."""

from __future__ import annotations

from pathlib import Path

import redis
from redis.commands.core import Script

from shoal.settings import Settings


def private_url_file(settings: Settings) -> Path:
    """Where `shoal up` writes the URL of the private redis-server it started."""
    return settings.run_dir / "redis.url"


def redis_url(settings: Settings) -> str:
    """SHOAL_REDIS_URL when set, else the private Redis that `shoal up` started."""
    if settings.redis_url:
        return settings.redis_url
    path = private_url_file(settings)
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        raise SystemExit(
            f"no Redis: SHOAL_REDIS_URL is unset and {path} does not exist (run `shoal up`)"
        ) from None


# Blocking reads (BLPOP on replies, transfers and execution results) wait up to a few minutes;
# the socket must outlast them. redis-py 8 otherwise cuts every read at 5 s.
SOCKET_TIMEOUT_S = 330


def client(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(
        redis_url(settings),
        decode_responses=True,
        health_check_interval=30,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=5,
    )


def binary_client(settings: Settings) -> redis.Redis:
    """A client that returns bytes, for file chunks."""
    return redis.Redis.from_url(
        redis_url(settings),
        health_check_interval=30,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=5,
    )


def script(source: str) -> Script:
    """A Lua script sent by its SHA (EVALSHA; the source goes once per server), run on whichever
    client is passed: `SCRIPT(keys=[...], args=[...], client=r)`."""
    return Script(None, source.encode())  # type: ignore[arg-type]
