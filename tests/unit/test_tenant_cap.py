"""The tenant session cap (SHOAL_TENANT_MAX_SESSIONS), on fakeredis.

The integration stack runs with one cap for every test, so the 429 is checked here, at the front
door, with a cap of 2: the refusal happens before any host is chosen.
"""

from __future__ import annotations

import fakeredis
import pytest

from api.app import create_app
from shoal import sessions, tenants
from shoal.pools import get_pool
from shoal.settings import Settings

CAP = 2


@pytest.fixture()
def app():
    settings = Settings(
        redis_url="redis://127.0.0.1:1/0", home="/tmp/shoal-unit", tenant_max_sessions=CAP
    )
    app = create_app(settings)
    app.extensions["shoal"].redis = fakeredis.FakeRedis(decode_responses=True)
    return app


def auth(app, tenant: str) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {tenants.create_key(app.extensions['shoal'].redis, tenant)[1]}"
    }


def fill(app, tenant: str, n: int) -> list[dict]:
    c = app.extensions["shoal"]
    pool = get_pool(c.settings, "default")
    return [sessions.create(c.redis, tenant, pool, "h1") for _ in range(n)]


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.headers["x-ms-error-code"] == code
    error = response.get_json()["error"]
    assert error["code"] == code
    return error


def test_past_the_cap_is_429_naming_the_setting(app) -> None:
    headers = auth(app, "acme")
    fill(app, "acme", CAP)
    error = assert_error(
        app.test_client().post("/v1/sessions", json={}, headers=headers), 429, "TenantSessionLimit"
    )
    assert "SHOAL_TENANT_MAX_SESSIONS" in error["message"] and str(CAP) in error["message"]


def test_new_identifier_past_the_cap_is_429(app) -> None:
    headers = auth(app, "acme")
    fill(app, "acme", CAP)
    response = app.test_client().post(
        "/pools/default/executions?identifier=new-one", json={"code": "1"}, headers=headers
    )
    assert_error(response, 429, "TenantSessionLimit")


def test_the_cap_is_per_tenant_and_freed_by_deleting(app) -> None:
    client = app.test_client()
    acme = auth(app, "acme")
    full = fill(app, "acme", CAP)
    # Another tenant is not limited by acme's sessions: it gets past the cap to host placement
    # (no worker runs here, hence 503).
    assert_error(client.post("/v1/sessions", json={}, headers=auth(app, "other")), 503,
                 "NoHostAvailable")  # fmt: skip
    r = app.extensions["shoal"].redis
    sessions.end(r, full[0], sessions.DELETED)  # what DELETE does (no broker here for the rest)
    assert sessions.count_for_tenant(r, "acme") == CAP - 1
    assert_error(client.post("/v1/sessions", json={}, headers=acme), 503, "NoHostAvailable")
