"""SHOAL_REDIS_URL against real servers on loopback, no VMs: a Redis that speaks only TLS
(rediss://), and a primary with a replica and three Sentinels (sentinel://) whose primary is
killed. Both carry a password. The registry's clients (shoal/redis_conn.py) and Celery's broker
(shoal/celery_app.py) are each shown to work: a ping, and a task sent, run by a real Celery
worker, and answered."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery.contrib.testing.worker import start_worker

from shoal import redis_conn
from shoal.celery_app import make_celery
from shoal.ops import tls
from shoal.settings import Settings
from tests.integration.redis_servers import (
    Servers,
    start_sentinel_set,
    wait_for_failover,
    wait_ready,
)

PASSWORD = secrets.token_urlsafe(24)
SENTINEL_PASSWORD = secrets.token_urlsafe(24)


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    found = Servers(tmp_path)
    yield found
    found.stop_all()


def celery_round_trip(settings: Settings, tag: str) -> None:
    """A task through the broker to a real worker (threads, as Shoal's), which answers on a
    list that the registry's client reads."""
    app = make_celery(settings)
    answers = f"shoal-test-answers-{tag}"

    @app.task(name="shoal.test.echo", shared=False)
    def echo(value: str) -> None:
        redis_conn.client(settings).rpush(answers, value)

    with start_worker(app, pool="threads", concurrency=2, perform_ping_check=False):
        app.send_task("shoal.test.echo", kwargs={"value": tag})
        popped = redis_conn.client(settings).blpop([answers], timeout=30)
    assert popped == (answers, tag)


def test_rediss_with_a_ca_file(servers: Servers, tmp_path: Path) -> None:
    certs = tmp_path / "tls"
    tls._generate(certs)  # a CA, and a server certificate for 127.0.0.1 that it signs
    server = servers.start(
        "tls",
        [
            f"requirepass {PASSWORD}",
            f"tls-cert-file {certs / 'server.pem'}",
            f"tls-key-file {certs / 'server.key'}",
            f"tls-ca-cert-file {certs / 'ca.pem'}",
            "tls-auth-clients no",
        ],
        tls=True,
    )
    url = f"rediss://:{PASSWORD}@127.0.0.1:{server.port}/0"
    settings = Settings(home=str(tmp_path / "home"), redis_url=url, redis_ca_file="")
    with_ca = Settings(
        home=str(tmp_path / "home"), redis_url=url, redis_ca_file=str(certs / "ca.pem")
    )
    wait_ready(redis_conn.client(with_ca))
    assert redis_conn.client(with_ca).set("over-tls", "yes")
    in_url = Settings(home=str(tmp_path / "home"), redis_url=f"{url}?ssl_ca_certs={certs}/ca.pem")
    assert redis_conn.binary_client(in_url).get("over-tls") == b"yes"
    # Without the CA the server's certificate is not trusted: refused, never used unverified.
    with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
        redis_conn.client(settings).ping()
    # Plain TCP to a TLS port gets nowhere.
    with pytest.raises(redis.ConnectionError):
        redis.Redis(port=server.port, password=PASSWORD, socket_timeout=3).ping()
    celery_round_trip(with_ca, "tls")


def test_sentinel_failover_keeps_clients_and_celery_going(servers: Servers, tmp_path: Path) -> None:
    s = start_sentinel_set(servers, PASSWORD, SENTINEL_PASSWORD)
    settings = Settings(home=str(tmp_path / "home"), redis_url=s.url(), redis_retry_s=30)
    r = redis_conn.client(settings)
    r.set("before", "kept")
    assert r.wait(1, 5000) == 1  # replicated before the primary dies
    celery_round_trip(settings, "before")

    # A blocking read is waiting on the primary when it dies; it must resume on the new one.
    popped: list = []
    waiter = threading.Thread(
        target=lambda: popped.append(redis_conn.client(settings).blpop(["wakeup"], timeout=60))
    )
    waiter.start()
    time.sleep(0.5)
    s.primary.kill()
    took = wait_for_failover(s)
    assert took < 15, took
    assert r.get("before") == "kept"  # the same client, now on the promoted replica
    r.rpush("wakeup", "after failover")
    waiter.join(timeout=30)
    assert popped == [("wakeup", "after failover")]
    celery_round_trip(settings, "after")
    assert s.primary_port() == s.replica.port
