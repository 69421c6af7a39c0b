"""The request rate per tenant: a token bucket in Redis, taken in the same round trip that reads
the API key (and the request's session), on fakeredis."""

from __future__ import annotations

import threading
import time

import fakeredis
import pytest

from api.app import create_app
from shoal import keys, sessions, tenants
from shoal.errors import RateLimited, ValidationFailed
from shoal.pools import Pool
from shoal.settings import Settings, load
from tests.unit.fakes import unit_settings


@pytest.fixture()
def r():
    return fakeredis.FakeRedis(decode_responses=True)


def authenticate(r, key: str, settings: Settings, session_key: str = ""):
    return tenants.authenticate_request(r, key, settings, session_key)


def test_a_burst_then_the_rate_then_429_with_retry_after(r) -> None:
    settings = unit_settings(tenant_rate=10.0, tenant_burst=3)
    _, key = tenants.create_key(r, "acme")
    for _ in range(3):
        assert authenticate(r, key, settings)[0] == "acme"
    with pytest.raises(RateLimited, match="10/s") as refused:
        authenticate(r, key, settings)
    assert refused.value.status == 429 and refused.value.retry_after_s == 1
    time.sleep(0.12)  # a token every 0.1 s
    assert authenticate(r, key, settings)[0] == "acme"
    with pytest.raises(RateLimited):
        authenticate(r, key, settings)


def test_retry_after_says_when_a_token_will_be_there(r) -> None:
    settings = unit_settings(tenant_rate=0.1, tenant_burst=1)  # one request per 10 s
    _, key = tenants.create_key(r, "slow")
    authenticate(r, key, settings)
    with pytest.raises(RateLimited) as refused:
        authenticate(r, key, settings)
    assert 9 <= refused.value.retry_after_s <= 10


def test_the_bucket_is_per_tenant_shared_by_its_keys_and_unknown_keys_cost_nothing(r) -> None:
    settings = unit_settings(tenant_rate=0.01, tenant_burst=2)
    _, first = tenants.create_key(r, "acme")
    _, second = tenants.create_key(r, "acme")
    _, theirs = tenants.create_key(r, "other")
    authenticate(r, first, settings)
    authenticate(r, second, settings)
    with pytest.raises(RateLimited):
        authenticate(r, first, settings)
    assert authenticate(r, theirs, settings)[0] == "other"
    assert authenticate(r, "shoal_not_a_key", settings) == (None, {})
    assert not r.exists(keys.tenant_bucket("None"))


def test_a_tenants_own_rate_and_burst_win(r) -> None:
    settings = unit_settings(tenant_rate=0.01, tenant_burst=1)
    _, key = tenants.create_key(r, "big")
    tenants.set_limits(r, "big", rate=0.01, burst=5)
    for _ in range(5):
        authenticate(r, key, settings)
    with pytest.raises(RateLimited, match="bursts of 5"):
        authenticate(r, key, settings)
    assert tenants.limits(r, "big", settings)["burst"] == 5
    tenants.set_limits(r, "big", burst=None)  # back to the setting
    assert tenants.limits(r, "big", settings)["burst"] == 1


def test_set_limits_refuses_what_is_not_a_limit(r) -> None:
    with pytest.raises(ValidationFailed, match="one of"):
        tenants.set_limits(r, "t", speed=3)
    with pytest.raises(ValidationFailed, match="whole number"):
        tenants.set_limits(r, "t", burst=2.5)
    with pytest.raises(ValidationFailed, match="positive"):
        tenants.set_limits(r, "t", rate=-1)
    tenants.set_limits(r, "t", rate=0.5, max_waits=2)
    assert r.hgetall(keys.tenant_limits("t")) == {"rate": "0.5", "max_waits": "2"}


def test_concurrent_requests_never_get_more_than_the_bucket_holds(r) -> None:
    settings = unit_settings(tenant_rate=0.001, tenant_burst=10)
    _, key = tenants.create_key(r, "acme")
    allowed: list[str] = []
    refused: list[RateLimited] = []
    start = threading.Barrier(50)

    def call() -> None:
        start.wait()
        try:
            allowed.append(authenticate(r, key, settings)[0])
        except RateLimited as exc:
            refused.append(exc)

    threads = [threading.Thread(target=call) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(allowed) == 10 and len(refused) == 40


def test_the_session_is_read_in_the_same_call(r) -> None:
    settings = unit_settings()
    _, key = tenants.create_key(r, "acme")
    entry = sessions.create(r, "acme", Pool(name="default"), "h1")
    tenant, read = authenticate(r, key, settings, keys.session(entry["id"]))
    assert tenant == "acme" and read == entry
    assert authenticate(r, key, settings, keys.session("ses_none")) == ("acme", {})


def test_the_defaults_and_a_rate_of_zero_is_refused() -> None:
    s = load({})
    assert (s.tenant_rate, s.tenant_burst) == (50.0, 100)
    with pytest.raises(SystemExit, match="SHOAL_TENANT_RATE"):
        load({"SHOAL_TENANT_RATE": "0"})


# --- at the front door ------------------------------------------------------------------------
@pytest.fixture()
def app():
    settings = Settings(
        redis_url="redis://127.0.0.1:1/0", home="/tmp/shoal-unit", tenant_rate=0.01, tenant_burst=2
    )
    app = create_app(settings)
    app.extensions["shoal"].redis = fakeredis.FakeRedis(decode_responses=True)
    return app


@pytest.mark.parametrize(
    "method, path",
    [
        ("GET", "/v1/sessions"),
        ("GET", "/v1/sessions/ses_0000"),
        ("GET", "/v1/executions/exe_0000"),
        ("GET", "/v1/pools"),
        ("GET", "/v1/batches/bat_0000"),
        ("GET", "/v1/sessions/ses_0000/files"),
        ("GET", "/pools/default/session?identifier=x"),
    ],
)
def test_every_authenticated_route_is_rate_limited(app, method: str, path: str) -> None:
    r = app.extensions["shoal"].redis
    headers = {"Authorization": f"Bearer {tenants.create_key(r, 'acme')[1]}"}
    client = app.test_client()
    for _ in range(2):
        assert client.open(path, method=method, headers=headers).status_code != 429
    response = client.open(path, method=method, headers=headers)
    assert response.status_code == 429, response.get_data(as_text=True)
    assert response.get_json()["error"]["code"] == "RateLimited"
    assert response.headers["x-ms-error-code"] == "RateLimited"
    assert 99 <= int(response.headers["Retry-After"]) <= 100
    assert "SHOAL_TENANT_RATE" in response.get_json()["error"]["message"]
    # Health is not a tenant's request.
    assert client.get("/healthz").status_code != 429


def test_a_request_about_a_session_costs_one_redis_round_trip(app) -> None:
    c = app.extensions["shoal"]
    c.settings = unit_settings(tenant_rate=1000.0, tenant_burst=1000)
    headers = {"Authorization": f"Bearer {tenants.create_key(c.redis, 'acme')[1]}"}
    entry = sessions.create(c.redis, "acme", Pool(name="default"), "h1")
    client = app.test_client()
    url = f"/v1/sessions/{entry['id']}"
    assert client.get(url, headers=headers).status_code == 200  # the script is loaded once
    calls: list[tuple] = []
    execute = c.redis.execute_command

    def counting(*args, **kwargs):
        calls.append(args[:1])
        return execute(*args, **kwargs)

    c.redis.execute_command = counting
    assert client.get(url, headers=headers).status_code == 200
    assert calls == [("EVALSHA",)]


def test_shoal_keys_limits_sets_and_shows_a_tenants_own(r, monkeypatch, capsys) -> None:
    from shoal.ops import cli

    monkeypatch.setattr(cli.redis_conn, "client", lambda _settings: r)
    argv = ["keys", "limits", "--tenant", "acme", "--rate", "2.5", "--burst", "5"]
    assert cli.main(argv + ["--max-waits", "2", "--max-session-pending", "3"]) == 0
    shown = capsys.readouterr().out
    assert "rate 2.5, burst 5, max_waits 2" in shown and "max_session_pending 3" in shown
    assert r.hgetall(keys.tenant_limits("acme")) == {
        "rate": "2.5",
        "burst": "5",
        "max_waits": "2",
        "max_session_pending": "3",
    }
    assert cli.main(["keys", "limits", "--tenant", "acme", "--rate", "0"]) == 0
    assert "rate" not in r.hgetall(keys.tenant_limits("acme"))
    assert cli.main(["keys", "limits", "--tenant", "acme", "--burst", "-1"]) == 2
