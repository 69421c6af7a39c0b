"""Real redis-server and redis-sentinel processes on loopback, for the tests of Shoal's Redis
connections (TLS, Sentinel failover): each started from its own 0600 configuration file under
the test's directory, and killed by its own pid at the end."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from shoal import secret_files
from shoal.ops.stack import free_port

START_TIMEOUT_S = 15


@dataclass
class Server:
    name: str
    port: int
    proc: subprocess.Popen
    folder: Path

    def kill(self) -> None:
        """SIGKILL: the server dies at once, without a word to its clients or replicas."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@dataclass
class Servers:
    root: Path
    started: list[Server] = field(default_factory=list)

    def start(self, name: str, lines: list[str], sentinel: bool = False) -> Server:
        """Start one server from a configuration of `lines` (port and dir are added)."""
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        port = free_port()
        conf = folder / ("sentinel.conf" if sentinel else "redis.conf")
        text = [f"port {port}", "bind 127.0.0.1", f"dir {folder}", *lines]
        secret_files.write_secret(conf, "\n".join(text) + "\n")
        argv = ["redis-sentinel" if sentinel else "redis-server", str(conf)]
        log = open(folder / "log", "ab")  # noqa: SIM115
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        server = Server(name, port, proc, folder)
        self.started.append(server)
        return server

    def stop_all(self) -> None:
        for server in self.started:
            server.kill()


def wait_ready(client: redis.Redis, timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if client.ping():
                return
        except redis.RedisError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.1)
