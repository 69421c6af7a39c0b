"""Admin keys, /healthz's two views, /metrics' auth, and the security headers on every kind of
response, on fakeredis (no worker, no VM); the docs page's assets served locally."""

from __future__ import annotations

import json
import re
import socket
import time

import pytest
import redis
from flask import Flask

from api import security_headers
from api.request_bounds import json_body_limit
from api.server import write_json_error
from shoal import admin_keys, keys, tenants
from shoal.hosts import TCG_WARNING
from tests.unit.fakes import HOST, publish_heartbeat, unit_app, unit_settings


@pytest.fixture()
def app() -> Flask:
    return unit_app()


@pytest.fixture()
def r(app: Flask):
    return app.extensions["shoal"].redis


@pytest.fixture()
def client(app: Flask):
    return app.test_client()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def healthy(r, accel: dict | None = None) -> None:
    """One live host whose heartbeat reports `accel`, and beat: /healthz answers 200."""
    publish_heartbeat(r)
    beat = json.loads(r.get(keys.host_heartbeat(HOST)))
    if accel is not None:
        beat["driver"]["accel"] = accel
    r.set(keys.host_heartbeat(HOST), json.dumps(beat), px=15000)
    r.set(keys.beat_heartbeat(), f"{time.time():.3f}")


TCG = {"kind": "tcg", "reason": "no vmx/svm flag in /proc/cpuinfo: KVM not usable; using TCG"}


# --- admin keys --------------------------------------------------------------------------------
def test_an_admin_key_is_kept_as_a_hash_with_no_tenant(r) -> None:
    key_id, key = admin_keys.create_admin_key(r)
    assert key.startswith(admin_keys.ADMIN_KEY_PREFIX)
    dump = json.dumps({k: r.type(k) == "hash" and r.hgetall(k) for k in r.keys("*")})
    assert key not in dump  # only its SHA-256
    entry = r.hgetall(keys.api_key(tenants.hash_key(key)))
    assert entry["role"] == "admin" and entry["key_id"] == key_id and "tenant" not in entry
    assert admin_keys.role_of(r, key) == admin_keys.ADMIN
    assert tenants.authenticate(r, key) is None  # no tenant data path takes it
    assert tenants.authenticate_request(r, key, unit_settings())[0] is None
    _, tenant_key = tenants.create_key(r, "acme")
    assert admin_keys.role_of(r, tenant_key) == admin_keys.TENANT
    assert admin_keys.role_of(r, "shoal_nope") is None and admin_keys.role_of(r, "x") is None
    assert tenants.revoke(r, key_id)
    assert admin_keys.role_of(r, key) is None


def test_a_tenant_named_admin_gets_no_admin_key(r) -> None:
    _, key = tenants.create_key(r, "admin")
    assert admin_keys.role_of(r, key) == admin_keys.TENANT


def test_an_admin_key_is_refused_on_every_tenant_route(app, client, r) -> None:
    """403 with the reason, and nothing is made: the admin key names no tenant."""
    admin = bearer(admin_keys.create_admin_key(r)[1])
    routes = [
        ("GET", "/v1/sessions"),
        ("POST", "/v1/sessions"),
        ("GET", "/v1/sessions/ses_0000"),
        ("POST", "/v1/sessions/ses_0000/executions"),
        ("GET", "/v1/sessions/ses_0000/files"),
        ("GET", "/v1/pools"),
        ("GET", "/v1/pools/default"),
        ("POST", "/v1/batches"),
        ("GET", "/v1/batches/bat_0000"),
        ("POST", "/pools/default/code/execute?api-version=2024-02-02-preview&identifier=a"),
        ("GET", "/pools/default/files?api-version=2024-02-02-preview&identifier=a"),
    ]
    before = sorted(r.keys("*"))
    for method, url in routes:
        response = client.open(url, method=method, headers=admin, json={"code": "1"})
        assert response.status_code == 403, (url, response.get_data(as_text=True))
        error = response.get_json()["error"]
        assert error["code"] == "Forbidden" and "admin key" in error["message"]
        assert response.headers["x-ms-error-code"] == "Forbidden"
    assert sorted(r.keys("*")) == before
    assert not app.extensions["shoal"].celery.sent


def test_keys_create_admin_and_list(monkeypatch, capsys, r) -> None:
    from shoal import redis_conn
    from shoal.ops import cli

    monkeypatch.setattr(redis_conn, "client", lambda settings: r)
    assert cli.main(["keys", "create", "--admin"]) == 0
    key = capsys.readouterr().out.split()[0]
    assert admin_keys.is_admin(r, key)
    cli.main(["keys", "create", "--tenant", "acme"])
    capsys.readouterr()
    assert cli.main(["keys", "list"]) == 0
    listed = capsys.readouterr().out
    assert "role=admin" in listed and "tenant=acme" in listed
    with pytest.raises(SystemExit):  # one or the other, not both
        cli.main(["keys", "create", "--admin", "--tenant", "acme"])


# --- /healthz and /metrics -----------------------------------------------------------------------
@pytest.mark.parametrize("is_healthy", [True, False])
def test_healthz_without_an_admin_key_says_only_its_status(client, r, is_healthy) -> None:
    if is_healthy:
        healthy(r, TCG)
    _, tenant_key = tenants.create_key(r, "acme")
    for headers in ({}, bearer(tenant_key)):
        response = client.get("/healthz", headers=headers)
        assert response.status_code == (200 if is_healthy else 503)
        assert response.get_json() == {"status": "ok" if is_healthy else "degraded"}


def test_healthz_with_a_key_that_is_not_valid_is_401(client) -> None:
    for header in ("Bearer shoal_never_issued", "Basic Zm9vOmJhcg==", "Bearer "):
        response = client.get("/healthz", headers={"Authorization": header})
        assert response.status_code == 401
        assert response.get_json()["error"]["code"] == "Unauthorized"


def test_healthz_admin_view_has_the_details_and_the_accelerator(client, r) -> None:
    healthy(r, TCG)
    admin = bearer(admin_keys.create_admin_key(r)[1])
    response = client.get("/healthz", headers=admin)
    assert response.status_code == 200
    report = response.get_json()
    assert report["status"] == "ok" and report["down"] == [] and report["redis"]["up"]
    accel = report["workers"][HOST]["accelerator"]
    assert accel["kind"] == "tcg" and "vmx/svm" in accel["reason"]
    assert accel["warning"] == TCG_WARNING and "not a hardware isolation boundary" in TCG_WARNING
    assert report["warnings"] == [f"{HOST}: {TCG_WARNING}"]


def test_healthz_admin_view_under_kvm_has_no_warning(client, r) -> None:
    healthy(r, {"kind": "kvm", "reason": "vmx/svm in /proc/cpuinfo and a working /dev/kvm"})
    report = client.get("/healthz", headers=bearer(admin_keys.create_admin_key(r)[1])).get_json()
    assert report["workers"][HOST]["accelerator"]["kind"] == "kvm"
    assert "warning" not in report["workers"][HOST]["accelerator"] and report["warnings"] == []


def test_an_unreported_accelerator_is_warned_about(client, r) -> None:
    healthy(r)  # a heartbeat without driver.accel (an older worker)
    report = client.get("/healthz", headers=bearer(admin_keys.create_admin_key(r)[1])).get_json()
    accel = report["workers"][HOST]["accelerator"]
    assert accel["kind"] == "unknown" and TCG_WARNING in accel["warning"]


def test_healthz_without_redis_is_503_even_for_an_admin_key(app, client, r) -> None:
    """The key cannot be checked: the public view, degraded, not a 500."""
    _, admin_key = admin_keys.create_admin_key(r)
    r.connection_pool.connection_kwargs["server"].connected = False
    with pytest.raises(redis.ConnectionError):
        r.ping()
    for headers in ({}, bearer(admin_key)):
        response = client.get("/healthz", headers=headers)
        assert response.status_code == 503 and response.get_json() == {"status": "degraded"}


def test_metrics_need_an_admin_key(client, r) -> None:
    _, tenant_key = tenants.create_key(r, "acme")
    _, admin_key = admin_keys.create_admin_key(r)
    none = client.get("/metrics")
    assert none.status_code == 401 and none.get_json()["error"]["code"] == "Unauthorized"
    bad = client.get("/metrics", headers=bearer("shoal_never_issued"))
    assert bad.status_code == 401
    tenant = client.get("/metrics", headers=bearer(tenant_key))
    assert tenant.status_code == 403 and tenant.get_json()["error"]["code"] == "Forbidden"
    assert tenant.headers["x-ms-error-code"] == "Forbidden"
    admin = client.get("/metrics", headers=bearer(admin_key))
    assert admin.status_code == 200 and admin.mimetype == "text/plain"
    assert "# TYPE shoal_host_up gauge" in admin.get_data(as_text=True)


# --- security headers ----------------------------------------------------------------------------
def assert_secure(response, *, cacheable: bool = False) -> None:
    h = response.headers
    assert h["X-Content-Type-Options"] == "nosniff"
    assert h["X-Frame-Options"] == "DENY"
    assert h["Referrer-Policy"] == "no-referrer"
    assert h["Strict-Transport-Security"].startswith("max-age=")
    assert "frame-ancestors 'none'" in h["Content-Security-Policy"]
    assert "default-src 'none'" in h["Content-Security-Policy"]
    if not cacheable:
        assert h["Cache-Control"] == "no-store"


def test_every_kind_of_response_carries_the_headers(app, client, r) -> None:
    @app.get("/test-boom")
    def boom():
        raise RuntimeError("a bug")

    _, tenant_key = tenants.create_key(r, "acme")
    admin_key = admin_keys.create_admin_key(r)[1]
    big = json_body_limit(app.extensions["shoal"].settings) + 1
    cases = [
        (client.get("/healthz"), 503),
        (client.get("/healthz", headers=bearer(admin_key)), 503),
        (client.get("/metrics", headers=bearer(admin_key)), 200),
        (client.get("/v1/pools", headers=bearer(tenant_key)), 200),
        (client.get("/openapi.json"), 200),
        (client.get("/v1/sessions"), 401),
        (client.get("/metrics", headers=bearer(tenant_key)), 403),
        (client.get("/nowhere"), 404),
        (client.get("/v1/sessions/ses_0000", headers=bearer(tenant_key)), 404),
        (client.post("/healthz"), 405),
        (client.post("/v1/sessions", headers=bearer(tenant_key), json="x" * big), 413),
        (
            client.post(
                "/v1/sessions", headers={**bearer(tenant_key), "Content-Type": "text/plain"},
                data="x",
            ),
            415,
        ),
        (client.get("/test-boom"), 500),
        (client.get("/docs"), 200),
    ]  # fmt: skip
    for response, status in cases:
        assert response.status_code == status, (status, response.get_data(as_text=True)[:200])
        assert_secure(response)


def test_the_headers_are_on_gunicorns_own_errors() -> None:
    """api/server.py writes the errors gunicorn answers itself (a malformed request line)."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        write_json_error(ours, 400, "Bad Request", "Invalid request line")
        head = theirs.recv(65536).decode().split("\r\n\r\n")[0]
    fields = dict(line.split(": ", 1) for line in head.split("\r\n")[1:])
    for name, value in security_headers.headers_for_error().items():
        assert fields[name] == value
    assert fields["Cache-Control"] == "no-store"


# --- the docs page -------------------------------------------------------------------------------
def test_the_docs_page_loads_everything_from_this_api(client) -> None:
    page = client.get("/docs")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assert "http://" not in html and "https://" not in html and "cdn" not in html.lower()
    # No inline script or style: the page works under script-src/style-src 'self'.
    assert "<style" not in html and " style=" not in html
    assert re.findall(r"<script(?![^>]*\bsrc=)[^>]*>", html) == []
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "style-src 'self'" in csp and "unsafe" not in csp
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert len(assets) == 4
    types = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}
    for url in assets:
        response = client.get(url)
        assert response.status_code == 200, url
        assert response.mimetype == types[url[url.rindex(".") :]], url
        assert response.headers["Cache-Control"].startswith("public")
        assert_secure(response, cacheable=True)
        assert len(response.get_data()) > 0
    init = client.get("/docs/assets/shoal-docs.js").get_data(as_text=True)
    assert '"/openapi.json"' in init and "validatorUrl: null" in init


def test_only_the_listed_assets_are_served(client) -> None:
    for name in ("LICENSE", "VERSION", "oauth2-redirect.html", "..%2F__init__.py", "nope.js"):
        response = client.get(f"/docs/assets/{name}")
        assert response.status_code == 404, name
        assert response.get_json()["error"]["code"] == "NotFound"
        assert_secure(response)
