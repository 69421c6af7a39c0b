"""Real redis-server and redis-sentinel processes on loopback, for the tests of Shoal's Redis
connections (TLS, Sentinel failover): each started from its own 0600 configuration file under
the test's directory, and killed by its own pid at the end."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from shoal import secret_files

START_TIMEOUT_S = 15
PORT_ATTEMPTS = 3
PORT_RANGE = (20000, 32000)


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

    def log_tail(self, lines: int = 25) -> str:
        text = (self.folder / "log").read_text(errors="replace").splitlines()
        return "\n".join(f"  {self.name}: {line}" for line in text[-lines:])


@dataclass
class Servers:
    root: Path
    started: list[Server] = field(default_factory=list)

    def start(
        self, name: str, lines: list[str], sentinel: bool = False, tls: bool = False
    ) -> Server:
        """Start one server from a configuration of `lines` (port and dir are added) and wait
        until it listens; with `tls`, its port speaks TLS only. A port taken before the server
        binds it is tried again with another."""
        for _attempt in range(PORT_ATTEMPTS):
            server = self._launch(name, lines, sentinel, tls)
            if _listening(server):
                self.started.append(server)
                return server
        raise AssertionError(f"{name} never listened:\n{server.log_tail()}")

    def _launch(self, name: str, lines: list[str], sentinel: bool, tls: bool) -> Server:
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        port = _unused_port()
        conf = folder / ("sentinel.conf" if sentinel else "redis.conf")
        ports = ["port 0", f"tls-port {port}"] if tls else [f"port {port}"]
        text = [*ports, "bind 127.0.0.1", f"dir {folder}", *lines]
        secret_files.write_secret(conf, "\n".join(text) + "\n")
        argv = ["redis-sentinel" if sentinel else "redis-server", str(conf)]
        (folder / "log").unlink(missing_ok=True)
        with open(folder / "log", "ab") as log:
            proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        return Server(name, port, proc, folder)

    def stop_all(self) -> None:
        for server in self.started:
            server.kill()


def _unused_port() -> int:
    """A loopback port free right now, below the ephemeral range (32768-60999 by default), so
    that no outgoing connection of the running stack takes it before the server binds it."""
    while True:
        port = random.randrange(*PORT_RANGE)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


def _listening(server: Server) -> bool:
    """True once the server says it listens (a Sentinel: once it names its primary, which it
    does after binding); False if it exited first (its port was taken) or never got there."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        log = (server.folder / "log").read_bytes()
        if b"Ready to accept connections" in log or b"+monitor master" in log:
            return True
        if server.proc.poll() is not None:
            return False
        time.sleep(0.05)
    server.kill()
    return False


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


@dataclass
class SentinelSet:
    """A primary, one replica and three Sentinels, every one password-protected."""

    primary: Server
    replica: Server
    sentinels: list[Server]
    password: str
    sentinel_password: str

    def url(self, db: int = 0) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return (
            f"sentinel://:{self.password}@{hosts}/{db}"
            f"?master_name={MASTER_NAME}&sentinel_password={self.sentinel_password}"
        )

    def sentinel_client(self, index: int = 0) -> redis.Redis:
        port = self.sentinels[index].port
        return redis.Redis(port=port, password=self.sentinel_password, decode_responses=True)

    def primary_port(self) -> int:
        """Where the Sentinels say the primary is now."""
        _host, port = self.sentinel_client().sentinel_get_master_addr_by_name(MASTER_NAME)
        return int(port)


MASTER_NAME = "shoal"
DOWN_AFTER_MS = 1000
READY_TIMEOUT_S = 45


def start_sentinel_set(servers: Servers, password: str, sentinel_password: str) -> SentinelSet:
    """Start the set and wait until the Sentinels know the replica and each other, so that a
    failover can happen."""
    auth = [f"requirepass {password}", f"masterauth {password}", "appendonly yes"]
    primary = servers.start("primary", auth)
    wait_ready(redis.Redis(port=primary.port, password=password))
    replica = servers.start("replica", [*auth, f"replicaof 127.0.0.1 {primary.port}"])
    # Replicating before the Sentinels start, the replica is in the primary's first INFO to them
    # (else they learn of it at their next INFO, 10 s later).
    linked = redis.Redis(port=replica.port, password=password, decode_responses=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not _linked(linked):
        assert time.monotonic() < deadline, "the replica never synchronised"
        time.sleep(0.1)
    sentinel_lines = [
        f"sentinel monitor {MASTER_NAME} 127.0.0.1 {primary.port} 2",
        f"sentinel auth-pass {MASTER_NAME} {password}",
        f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}",
        f"sentinel failover-timeout {MASTER_NAME} 10000",
        f"requirepass {sentinel_password}",
        f"sentinel sentinel-pass {sentinel_password}",
    ]
    sentinels = [servers.start(f"sentinel{i}", sentinel_lines, sentinel=True) for i in range(3)]
    found = SentinelSet(primary, replica, sentinels, password, sentinel_password)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not _ready_for_failover(found):
        if time.monotonic() > deadline:
            logs = "\n".join(server.log_tail() for server in servers.started)
            raise AssertionError(f"the Sentinels never saw the replica and each other:\n{logs}")
        time.sleep(0.2)
    return found


def _linked(replica: redis.Redis) -> bool:
    try:
        return replica.info("replication").get("master_link_status") == "up"
    except redis.RedisError:
        return False


def _ready_for_failover(s: SentinelSet) -> bool:
    try:
        link = redis.Redis(port=s.replica.port, password=s.password).info("replication")
        if link.get("master_link_status") != "up":
            return False
        for index in range(len(s.sentinels)):
            client = s.sentinel_client(index)
            replicas = client.sentinel_slaves(MASTER_NAME)
            peers = client.sentinel_sentinels(MASTER_NAME)
            if not replicas or len(peers) < len(s.sentinels) - 1:
                return False
        return True
    except redis.RedisError:
        return False


def wait_for_failover(s: SentinelSet, timeout_s: float = 30) -> float:
    """Wait until the Sentinels name the replica as primary and it accepts writes; seconds."""
    started = time.monotonic()
    promoted = redis.Redis(port=s.replica.port, password=s.password)
    while True:
        try:
            if s.primary_port() == s.replica.port and promoted.info("replication")["role"] == (
                "master"
            ):
                return time.monotonic() - started
        except redis.RedisError:
            pass
        assert time.monotonic() - started < timeout_s, "no failover"
        time.sleep(0.1)
