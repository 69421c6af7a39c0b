"""The private Redis that `shoal up` starts when SHOAL_REDIS_URL is unset: its configuration file,
its password and its data directory.

Everything that would let another local user in stays out of their reach: the password is
generated once (32 random bytes) and lives only in `SHOAL_HOME/redis/redis.conf` (0600) and in
`SHOAL_HOME/run/redis.url` (0600, shoal/secret_files.py), never on a command line (any local user
can read /proc/PID/cmdline); the data directory (append-only files) is 0700. Starting again after
a stop or a crash reuses the same password and data, so clients' URL and every record survive.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

from shoal import redis_conn, secret_files
from shoal.secret_files import read_secret
from shoal.settings import Settings

DATA_MODE = 0o700
# How long a restart waits for the old port before it takes a new one (previous_port).
PORT_WAIT_S = 10.0
PASSWORD_DIRECTIVE = "requirepass "


def data_dir(settings: Settings) -> Path:
    return Path(settings.home) / "redis"


def config_file(settings: Settings) -> Path:
    return data_dir(settings) / "redis.conf"


def previous_port(settings: Settings, wait_s: float = PORT_WAIT_S) -> int | None:
    """The port it had, once that port is free (within `wait_s`): started again there, the
    processes that still run reconnect to it by themselves. A connection the dead server left
    half-closed holds the port until its client notices (at its next command) and closes it."""
    try:
        port = int(urlsplit(read_secret(redis_conn.private_url_file(settings))).port or 0)
    except (FileNotFoundError, ValueError):
        return None
    if not port:
        return None
    deadline = time.monotonic() + wait_s
    while not _bindable(port):
        if time.monotonic() > deadline:
            return None
        time.sleep(0.2)
    return port


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        # As redis-server binds: connections the dead one left in TIME_WAIT do not count.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def password(settings: Settings) -> str:
    """The private Redis's password: the one its configuration already has, else a new one."""
    try:
        for line in config_file(settings).read_text().splitlines():
            if line.startswith(PASSWORD_DIRECTIVE):
                return line[len(PASSWORD_DIRECTIVE) :].strip()
    except FileNotFoundError:
        pass
    return secrets.token_urlsafe(32)


def write_config(settings: Settings, port: int) -> Path:
    """Write redis.conf (0600) for a Redis on 127.0.0.1:`port`; return its path."""
    data = data_dir(settings)
    data.mkdir(parents=True, exist_ok=True)
    os.chmod(data, DATA_MODE)  # also for a directory made before Shoal set modes
    lines = [
        "bind 127.0.0.1",
        f"port {port}",
        "protected-mode yes",
        f"dir {data}",
        "appendonly yes",
        'save ""',
        # Bounded, and never evicting: an evicted record would be state lost without a word.
        # The tenants' data is refused before this is reached (shoal/storage.py), leaving
        # headroom for heartbeats, the session registry and control writes (docs/limits.md).
        f"maxmemory {settings.redis_maxmemory_bytes}",
        "maxmemory-policy noeviction",
        # Redis 7 already refuses these by default; said here so that no later default or
        # edit can let a client with the password write files where it likes or load code.
        "enable-protected-configs no",
        "enable-debug-command no",
        "enable-module-command no",
        f"{PASSWORD_DIRECTIVE}{password(settings)}",
    ]
    path = config_file(settings)
    secret_files.write_secret(path, "\n".join(lines) + "\n")
    return path
