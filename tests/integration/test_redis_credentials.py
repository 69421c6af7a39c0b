"""The private Redis has a password that appears on no command line, files only its owner can
read, and keeps both its password and its data when it is started again after dying."""

from __future__ import annotations

import os
import signal
import socket
import stat
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis

from shoal import redis_conn
from shoal.ops import private_redis, processes, stack
from shoal.settings import Settings, load
from tests.integration.conftest import Stack


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def assert_refuses_strangers(url: str) -> None:
    """What any local user can try: commands without a password, and a guessed password."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=5) as raw:
        raw.sendall(b"SET shoal-test-anonymous 1\r\nKEYS *\r\n")
        answer = b""
        while answer.count(b"\r\n") < 2:
            answer += raw.recv(4096)
    assert answer.startswith(b"-NOAUTH"), answer
    assert answer.count(b"-NOAUTH") == 2, answer
    guessing = redis.Redis(host=parts.hostname, port=parts.port, password="guess")
    with pytest.raises(redis.AuthenticationError):
        guessing.ping()


def test_private_redis_has_a_password_and_owner_only_files(tmp_path: Path) -> None:
    settings = Settings(home=str(tmp_path / "home"), redis_maxmemory_mib=64)
    stack.start_redis(settings)
    try:
        url_file = redis_conn.private_url_file(settings)
        url = url_file.read_text().strip()
        password = urlsplit(url).password
        assert password and len(password) >= 40
        assert mode(url_file) == 0o600
        assert mode(private_redis.config_file(settings)) == 0o600
        assert mode(private_redis.data_dir(settings)) == 0o700
        pid = processes.running_pid(settings, "redis")
        assert pid is not None
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert password.encode() not in cmdline
        assert_refuses_strangers(url)
        r = redis_conn.client(settings)
        r.set("kept", "across restarts")
        assert list(private_redis.data_dir(settings).rglob("*.aof")), "append-only file is off"

        os.kill(pid, signal.SIGKILL)  # died; `shoal up` starts it again (stack.up)
        _wait_dead(pid)
        # A client notices at its next command and closes its connection (Shoal's processes
        # talk to Redis every few seconds): until then the dead server's side holds the port.
        r.connection_pool.disconnect()
        stack.start_redis(settings)
        again = url_file.read_text().strip()
        assert again == url  # same password, same port
        assert mode(url_file) == 0o600
        assert redis_conn.client(settings).get("kept") == "across restarts"
        assert r.get("kept") == "across restarts"  # a client of before reconnects by itself
        assert_refuses_strangers(again)
    finally:
        processes.stop(settings, "redis")


def _wait_dead(pid: int) -> None:
    deadline = time.monotonic() + 10
    while processes.alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def test_the_stack_uses_its_redis_with_the_password(stack: Stack) -> None:
    """Everything in the shared stack (API, worker, beat, CLI) reached Redis with the password;
    a client without it is refused."""
    settings = load(stack.env)
    url_file = redis_conn.private_url_file(settings)
    assert mode(url_file) == 0o600
    assert_refuses_strangers(url_file.read_text().strip())
    assert stack.new_key("redis-credentials")  # the CLI
    assert stack.execute(stack.new_session(), "6 * 7")["result"]["text/plain"] == "42"
