"""SHOAL_REDIS_URL: the three accepted forms, what each becomes for redis-py and for Celery, and
the clear refusal of anything else (nothing here connects)."""

from __future__ import annotations

import ssl

import pytest
from redis.sentinel import SentinelConnectionPool

from shoal import redis_conn
from shoal.celery_app import make_celery
from shoal.redis_target import BadRedisURL, parse
from shoal.settings import Settings


def test_plain_url_with_password() -> None:
    t = parse("redis://:s3cret@10.0.0.5:6380/2")
    assert (t.scheme, t.hosts, t.db, t.password, t.username) == (
        "redis", (("10.0.0.5", 6380),), 2, "s3cret", None
    )  # fmt: skip
    assert t.redis_kwargs() == {"db": 2, "username": None, "password": "s3cret"}
    broker, config = t.celery_broker()
    assert broker == "redis://:s3cret@10.0.0.5:6380/2"
    assert "broker_use_ssl" not in config


def test_tls_url_verifies_the_server_against_a_ca() -> None:
    t = parse("rediss://shoal:p%40ss@redis.internal:6380/0?ssl_ca_certs=/etc/ca.pem")
    assert t.tls and t.username == "shoal" and t.password == "p@ss"
    kwargs = t.redis_kwargs()
    assert kwargs["ssl"] is True and kwargs["ssl_cert_reqs"] == "required"
    assert kwargs["ssl_check_hostname"] is True and kwargs["ssl_ca_certs"] == "/etc/ca.pem"
    broker, config = t.celery_broker()
    assert broker == "rediss://shoal:p%40ss@redis.internal:6380/0"
    assert config["broker_use_ssl"] == {
        "ssl_cert_reqs": ssl.CERT_REQUIRED,
        "ssl_ca_certs": "/etc/ca.pem",
    }
    # SHOAL_REDIS_CA_FILE when the URL names none; the URL's own wins.
    assert parse("rediss://h:1/0", ca_file="/ca2.pem").ca_file == "/ca2.pem"
    assert parse("rediss://h:1/0?ssl_ca_certs=/ca1.pem", ca_file="/ca2.pem").ca_file == "/ca1.pem"


def test_sentinel_url_becomes_kombus_list_and_a_master_name() -> None:
    t = parse(
        "sentinel://:pw@127.0.0.1:26379,127.0.0.1:26380,[::1]:26381/1"
        "?master_name=shoal&sentinel_password=spw"
    )
    assert t.sentinel and t.master_name == "shoal" and t.db == 1
    assert t.hosts == (("127.0.0.1", 26379), ("127.0.0.1", 26380), ("::1", 26381))
    broker, config = t.celery_broker()
    assert broker == (
        "sentinel://:pw@127.0.0.1:26379/1;sentinel://:pw@127.0.0.1:26380/1;"
        "sentinel://:pw@[::1]:26381/1"
    )
    options = config["broker_transport_options"]
    assert options["master_name"] == "shoal"
    assert options["sentinel_kwargs"]["password"] == "spw"


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://h:1/0", "scheme"),
        ("redis://h:1/0?ssl_cert_reqs=none", "no option ssl_cert_reqs"),
        ("rediss://h:1/0?ssl_cert_reqs=none", "no option ssl_cert_reqs"),
        ("redis://a:1,b:2/0", "only a sentinel"),
        ("sentinel://h:26379/0", "master_name"),
        ("redis://h:notaport/0", "bad port"),
        ("redis://h:1/zero", "database number"),
    ],
)
def test_anything_else_is_refused_with_a_reason(url: str, says: str) -> None:
    with pytest.raises(BadRedisURL, match=says):
        parse(url)


def test_clients_and_celery_follow_the_url() -> None:
    sentinel = Settings(
        redis_url="sentinel://:pw@127.0.0.1:1,127.0.0.1:2/0?master_name=m", redis_retry_s=10
    )
    client = redis_conn.client(sentinel)
    assert isinstance(client.connection_pool, SentinelConnectionPool)
    assert client.connection_pool.service_name == "m"
    assert client.get_retry().get_retries() == 20  # 10 s in steps of 0.5 s
    app = make_celery(sentinel)
    assert app.conf.broker_transport_options["master_name"] == "m"
    assert app.conf.broker_transport_options["ack_emulation"] is False
    assert app.conf.task_publish_retry_policy["max_retries"] == 20

    tls = Settings(redis_url="rediss://:pw@h:6380/0", redis_ca_file="/ca.pem")
    kwargs = redis_conn.client(tls).connection_pool.connection_kwargs
    assert kwargs["ssl_ca_certs"] == "/ca.pem" and kwargs["password"] == "pw"
    assert make_celery(tls).conf.broker_use_ssl["ssl_cert_reqs"] == ssl.CERT_REQUIRED
