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

    def start(
        self, name: str, lines: list[str], sentinel: bool = False, tls: bool = False
    ) -> Server:
        """Start one server from a configuration of `lines` (port and dir are added); with
        `tls`, its port speaks TLS only."""
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        port = free_port()
        conf = folder / ("sentinel.conf" if sentinel else "redis.conf")
        ports = ["port 0", f"tls-port {port}"] if tls else [f"port {port}"]
        text = [*ports, "bind 127.0.0.1", f"dir {folder}", *lines]
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
    deadline = time.monotonic() + 30
    while not _ready_for_failover(found):
        assert time.monotonic() < deadline, "the Sentinels never saw the replica and each other"
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
