"""Which Redis this instance uses, and clients for it.

SHOAL_REDIS_URL (parsed by shoal/redis_target.py) names one Redis, over TCP or verified TLS, or
the Sentinels of a replicated one; unset, the private Redis that `shoal up` started, whose URL
(password included) is in SHOAL_HOME/run/redis.url, 0600. Clients of a Sentinel-watched Redis
follow its primary through a failover (docs/security.md, "Redis").
"""

from __future__ import annotations

import math
import socket
from pathlib import Path

import redis
from redis.backoff import ConstantBackoff
from redis.commands.core import Script
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelManagedConnection

from shoal import redis_target
from shoal.redis_target import RedisTarget
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
# ... so a server that vanished without closing the connection (a host that lost power, a
# network cut) is noticed by TCP keepalive within about 30 s instead.
KEEPALIVE = {socket.TCP_KEEPIDLE: 10, socket.TCP_KEEPINTVL: 5, socket.TCP_KEEPCNT: 4}
# Pause between a Sentinel client's attempts while its primary is gone.
FAILOVER_RETRY_STEP_S = 0.5


class PrimaryFollowingConnection(SentinelManagedConnection):
    """A connection to whichever server the Sentinels name as primary, asked on every connect.

    redis-py 8.1 reconnects a dropped connection through `connect_check_health`, which dials
    the address the connection had: after a failover, the dead primary's, for as long as the
    retries last. Here every (re)connect asks the Sentinels first, and does not retry the same
    address itself: the command's retry (FAILOVER_RETRY_STEP_S apart) asks them again."""

    def connect_check_health(
        self, check_health: bool = True, retry_socket_connect: bool = True
    ) -> None:
        if self._sock:
            return
        if self.connection_pool.is_master:
            self.host, self.port = self.connection_pool.get_master_address()
        super().connect_check_health(check_health=check_health, retry_socket_connect=False)


def target(settings: Settings) -> RedisTarget:
    return redis_target.parse(redis_url(settings), settings.redis_ca_file)


def _connect(settings: Settings, decode: bool) -> redis.Redis:
    where = target(settings)
    common: dict = {
        "decode_responses": decode,
        "health_check_interval": 30,
        "socket_timeout": SOCKET_TIMEOUT_S,
        "socket_connect_timeout": 5,
        "socket_keepalive": True,
        "socket_keepalive_options": KEEPALIVE,
        **where.redis_kwargs(),
    }
    if not where.sentinel:
        host, port = where.hosts[0]
        return redis.Redis(host=host, port=port, **common)
    # A command that meets a dead primary (connection refused or reset, or READONLY from a
    # demoted one) is retried, each time asking the Sentinels where the primary is now, for
    # SHOAL_REDIS_RETRY_S: a blocked BLPOP is sent again to the new primary.
    attempts = max(1, math.ceil(settings.redis_retry_s / FAILOVER_RETRY_STEP_S))
    retry = Retry(ConstantBackoff(FAILOVER_RETRY_STEP_S), attempts)
    sentinels = Sentinel(
        list(where.hosts),
        sentinel_kwargs=where.sentinel_kwargs(),
        socket_connect_timeout=5,
    )
    return sentinels.master_for(
        where.master_name,
        redis_class=redis.Redis,
        retry=retry,
        connection_class=PrimaryFollowingConnection,
        **common,
    )


def client(settings: Settings) -> redis.Redis:
    return _connect(settings, decode=True)


def binary_client(settings: Settings) -> redis.Redis:
    """A client that returns bytes, for file chunks."""
    return _connect(settings, decode=False)


def script(source: str) -> Script:
    """A Lua script sent by its SHA (EVALSHA; the source goes once per server), run on whichever
    client is passed: `SCRIPT(keys=[...], args=[...], client=r)`."""
    return Script(None, source.encode())  # type: ignore[arg-type]
