"""The front door's validation and error shapes, on fakeredis (no worker, no VM)."""

from __future__ import annotations

import fakeredis
import kombu.exceptions
import pytest
import redis

from api.app import create_app
from shoal import admin_keys, sessions, tenants
from shoal.pools import Pool
from shoal.settings import Settings


@pytest.fixture()
def app():
    app = create_app(Settings(redis_url="redis://127.0.0.1:1/0", home="/tmp/shoal-unit"))
    app.extensions["shoal"].redis = fakeredis.FakeRedis(decode_responses=True)
    return app


@pytest.fixture()
def client(app):
    return app.test_client()


@pytest.fixture()
def key(app) -> str:
    return tenants.create_key(app.extensions["shoal"].redis, "acme")[1]


@pytest.fixture()
def admin(app) -> dict[str, str]:
    return auth(admin_keys.create_admin_key(app.extensions["shoal"].redis)[1])


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_error(response, status: int, code: str, *words: str) -> None:
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert body["error"]["code"] == code
    assert response.headers["x-ms-error-code"] == code
    for word in words:
        assert word in body["error"]["message"]


def test_missing_and_bad_keys_are_401(client) -> None:
    assert_error(client.get("/v1/sessions"), 401, "Unauthorized", "Bearer")
    bad = client.get("/v1/sessions", headers=auth("shoal_nope"))
    assert_error(bad, 401, "Unauthorized", "not valid")


def test_unknown_session_is_404(client, key) -> None:
    response = client.get("/v1/sessions/ses_0000", headers=auth(key))
    assert_error(response, 404, "SessionNotFound", "ses_0000")


def test_another_tenants_session_is_not_found(app, client, key) -> None:
    r = app.extensions["shoal"].redis
    theirs = sessions.create(r, "other", Pool(name="default"), "h1")
    response = client.get(f"/v1/sessions/{theirs['id']}", headers=auth(key))
    assert_error(response, 404, "SessionNotFound")


def test_execution_validation_names_the_field(app, client, key) -> None:
    r = app.extensions["shoal"].redis
    mine = sessions.create(r, "acme", Pool(name="default"), "h1")
    url = f"/v1/sessions/{mine['id']}/executions"
    cases = [
        ({}, "code"),
        ({"code": "1", "timeout_s": 0}, "timeout_s"),
        ({"code": "1", "timeout_s": 221}, "220"),
        ({"code": "1", "language": "cobol"}, "language"),
        ({"code": "1", "surprise": True}, "surprise"),
        ({"code": 5}, "code"),
    ]
    for body, word in cases:
        assert_error(client.post(url, json=body, headers=auth(key)), 400, "ValidationFailed", word)


def test_a_callback_url_that_does_not_parse_is_400(app, client, key) -> None:
    """urlsplit raises ValueError on an unclosed IPv6 bracket, which was a 500 (found probing
    the edge cases the fuzzing run, tests/integration/test_api_fuzz.py, does not generate)."""
    r = app.extensions["shoal"].redis
    mine = sessions.create(r, "acme", Pool(name="default"), "h1")
    for url, body in [
        (f"/v1/sessions/{mine['id']}/executions", {"code": "1", "callback_url": "http://[::1"}),
        ("/v1/batches", {"items": [{"code": "1"}], "callback_url": "https://[fe80::1/x"}),
    ]:
        response = client.post(url, json=body, headers=auth(key))
        assert_error(response, 400, "ValidationFailed", "callback_url", "not a valid URL")


def test_dynamic_list_skip_takes_ascii_digits_only(client, key) -> None:
    """'²'.isdigit() is true and int('²') raises: `skip=²` was a 500."""
    for route in ("/pools/default/listSessions", "/pools/default/.management/listSessions"):
        call = client.post if ".management" in route else client.get
        for skip in ("%C2%B2", "%D9%A3", "-1", "1.5", ""):
            response = call(f"{route}?skip={skip}", headers=auth(key))
            assert_error(response, 400, "SessionRequestValidationFailed", "skip")
        # Past every session there can be: an empty page (int() refuses 4,300+ digits).
        response = call(f"{route}?skip={'9' * 4400}", headers=auth(key))
        assert response.status_code == 200, response.get_data(as_text=True)
        assert response.get_json() in (
            {"sessions": []},
            {"value": [], "count": 0, "nextLink": None},
        )
        assert call(f"{route}?skip=007", headers=auth(key)).status_code == 200


def test_an_identifier_with_a_trailing_newline_is_refused(client, key) -> None:
    """IDENTIFIER.match() took "abc\n" ($ matches before a final newline)."""
    response = client.get("/pools/default/session?identifier=abc%0A", headers=auth(key))
    assert_error(response, 400, "SessionRequestValidationFailed", "identifier")


def test_malformed_json_is_400(app, client, key) -> None:
    response = client.post(
        "/v1/sessions", data="{nope", headers={**auth(key), "Content-Type": "application/json"}
    )
    assert_error(response, 400, "ValidationFailed")


def test_unknown_pool_is_404(client, key) -> None:
    response = client.post("/v1/sessions", json={"pool": "gpu"}, headers=auth(key))
    assert_error(response, 404, "PoolNotFound", "gpu")


def test_no_live_host_is_503(client, key) -> None:
    response = client.post("/v1/sessions", json={}, headers=auth(key))
    assert_error(response, 503, "NoHostAvailable")


def test_healthz_names_what_is_down(app, client, admin) -> None:
    r = app.extensions["shoal"].redis
    r.sadd("shoal:hosts", "h1")
    response = client.get("/healthz", headers=admin)
    assert response.status_code == 503
    assert "worker h1" in response.get_json()["down"]
    assert "beat" in response.get_json()["down"]


def test_unknown_route_is_json_404(client) -> None:
    assert_error(client.get("/nowhere"), 404, "NotFound")


def test_openapi_document_is_served(client) -> None:
    spec = client.get("/openapi.json").get_json()
    assert "/v1/sessions/{session_id}/executions" in spec["paths"]


def test_metrics_are_prometheus_text(app, client, admin) -> None:
    from shoal import metrics

    r = app.extensions["shoal"].redis
    metrics.incr(r, "shoal_session_acquisitions_total", pool="default", source="ready")
    metrics.observe(r, "shoal_execution_seconds", 0.004, pool="default")
    metrics.observe(r, "shoal_execution_seconds", 0.02, pool="default")
    metrics.observe(r, "shoal_execution_seconds", 500, pool="default")
    text = client.get("/metrics", headers=admin).get_data(as_text=True)
    assert 'shoal_session_acquisitions_total{pool="default",source="ready"} 1' in text
    # Cumulative buckets, as Prometheus reads them.
    assert 'shoal_execution_seconds_bucket{le="0.005",pool="default"} 1' in text
    assert 'shoal_execution_seconds_bucket{le="0.01",pool="default"} 1' in text
    assert 'shoal_execution_seconds_bucket{le="0.025",pool="default"} 2' in text
    assert 'shoal_execution_seconds_bucket{le="220",pool="default"} 2' in text
    assert 'shoal_execution_seconds_bucket{le="+Inf",pool="default"} 3' in text
    assert 'shoal_execution_seconds_count{pool="default"} 3' in text
    assert 'shoal_execution_seconds_sum{pool="default"} 500.024' in text


def test_a_body_that_is_not_json_is_415(app, client, key) -> None:
    r = app.extensions["shoal"].redis
    mine = sessions.create(r, "acme", Pool(name="default"), "h1")
    for url in ("/v1/sessions", f"/v1/sessions/{mine['id']}/executions"):
        response = client.post(
            url, data="code=1", headers={**auth(key), "Content-Type": "text/plain"}
        )
        assert_error(response, 415, "UnsupportedMediaType", "application/json")


def test_redis_down_is_503_store_unavailable(app, client, key) -> None:
    """A request that reaches a Redis that does not answer (restarting) hears so, with a
    Retry-After: a 503, never a 500."""
    app.extensions["shoal"].redis = redis.Redis.from_url(
        "redis://127.0.0.1:1/0", socket_connect_timeout=0.5
    )
    response = client.get("/v1/sessions", headers=auth(key))
    assert_error(response, 503, "StoreUnavailable", "Redis", "retry")
    assert response.headers["Retry-After"] == "2"


def test_a_task_that_cannot_be_published_is_503_store_unavailable(
    app, client, key, monkeypatch
) -> None:
    """Celery giving up on its broker (the same Redis) is an outage too: a 503 with a
    Retry-After, never a 500."""

    def broker_gone(*args, **kwargs):
        raise kombu.exceptions.OperationalError("Error 111 connecting to 127.0.0.1:6379")

    monkeypatch.setattr(app.extensions["shoal"].celery, "send_task", broker_gone)
    r = app.extensions["shoal"].redis
    mine = sessions.create(r, "acme", Pool(name="default"), "h1")
    url = f"/v1/sessions/{mine['id']}/executions"
    response = client.post(url, json={"code": "1", "wait": False}, headers=auth(key))
    assert_error(response, 503, "StoreUnavailable", "task queue", "retry")
    assert response.headers["Retry-After"] == "2"
