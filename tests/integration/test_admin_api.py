"""The API surface on the real stack: /healthz's public and admin views (the accelerator included),
/metrics' keys, the security headers on both listeners and on gunicorn's own errors, the docs
page's assets served by the API itself, and `shoal up` refusing under SHOAL_REQUIRE_KVM=1."""

from __future__ import annotations

import re
import socket
import subprocess

import requests

from shoal import host_memory
from shoal.hosts import TCG_WARNING
from shoal.settings import load
from tests.integration.conftest import REPO, SHOAL, Stack, processes_of


def assert_secure(response: requests.Response) -> None:
    h = response.headers
    assert h["X-Content-Type-Options"] == "nosniff"
    assert h["Strict-Transport-Security"].startswith("max-age=")
    assert "frame-ancestors 'none'" in h["Content-Security-Policy"]
    assert h["X-Frame-Options"] == "DENY" and h["Referrer-Policy"] == "no-referrer"


def test_healthz_public_view_is_only_the_status(stack: Stack) -> None:
    for headers in ({}, stack.headers()):  # no key, a tenant's key
        response = requests.get(f"{stack.url}/healthz", headers=headers, timeout=10)
        assert response.status_code == 200 and response.json() == {"status": "ok"}
        assert_secure(response)
        assert response.headers["Cache-Control"] == "no-store"


def test_healthz_admin_view_has_each_workers_memory_and_sharing_mode(stack: Stack) -> None:
    report = requests.get(f"{stack.url}/healthz", headers=stack.admin_headers(), timeout=10).json()
    memory = report["workers"]["testhost"]["memory"]
    assert memory["total_mib"] == host_memory.read(0).total_mib
    assert 0 < memory["available_mib"] <= memory["total_mib"]
    assert memory["reserve_mib"] == load(stack.env).host_memory_reserve_mib
    sharing = memory["sharing"]
    assert sharing["mode"] in ("template-memory", "auto"), sharing  # auto: no VM started yet
    assert sharing["ksm"].startswith("off"), sharing  # never turned on by Shoal
    assert "whole snapshot" in sharing["full_copy"]


def test_healthz_admin_view_names_the_accelerator_and_up_said_it(stack: Stack) -> None:
    assert (stack.home / "admin-api-key").stat().st_mode & 0o777 == 0o600
    response = requests.get(f"{stack.url}/healthz", headers=stack.admin_headers(), timeout=10)
    assert response.status_code == 200, response.text
    report = response.json()
    assert report["status"] == "ok" and report["down"] == [] and report["redis"]["up"]
    accel = report["workers"]["testhost"]["accelerator"]
    assert accel["kind"] in ("kvm", "tcg") and accel["reason"]
    said = f"guests on testhost run under {accel['kind'].upper()} ({accel['reason']})"
    assert said in stack.up_output
    if accel["kind"] == "tcg":  # this project's machines (host.md)
        assert accel["warning"] == TCG_WARNING
        assert f"WARNING: {TCG_WARNING}" in stack.up_output
        assert report["warnings"] == [f"testhost: {TCG_WARNING}"]
    else:
        assert "warning" not in accel and report["warnings"] == []


def test_metrics_answer_only_an_admin_key(stack: Stack) -> None:
    url = f"{stack.url}/metrics"
    none = requests.get(url, timeout=10)
    assert none.status_code == 401 and none.json()["error"]["code"] == "Unauthorized"
    tenant = requests.get(url, headers=stack.headers(), timeout=10)
    assert tenant.status_code == 403 and tenant.json()["error"]["code"] == "Forbidden"
    admin = requests.get(url, headers=stack.admin_headers(), timeout=10)
    assert admin.status_code == 200 and "shoal_host_up" in admin.text
    for response in (none, tenant, admin):
        assert_secure(response)


def test_an_admin_key_reaches_no_tenant_route(stack: Stack) -> None:
    for method, path in (("GET", "/v1/sessions"), ("POST", "/v1/sessions"), ("GET", "/v1/pools")):
        response = requests.request(
            method, f"{stack.url}{path}", json={}, headers=stack.admin_headers(), timeout=10
        )
        assert response.status_code == 403, response.text
        assert "admin key" in response.json()["error"]["message"]


def test_the_tls_listener_sends_the_headers_too(stack: Stack) -> None:
    ca = str(stack.home / "tls" / "ca.pem")
    for path, status in (("/healthz", 200), ("/nowhere", 404), ("/metrics", 401)):
        response = requests.get(f"{stack.tls_url}{path}", verify=ca, timeout=10)
        assert response.status_code == status
        assert_secure(response)
        assert response.headers["Cache-Control"] == "no-store"


def test_gunicorns_own_error_carries_the_headers(stack: Stack) -> None:
    port = int(stack.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header: x\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(4096)
            if not chunk:
                break
            head += chunk
    lines = head.decode("latin-1").split("\r\n\r\n")[0].split("\r\n")
    assert lines[0].startswith("HTTP/1.1 400")
    fields = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
    assert fields["x-content-type-options"] == "nosniff"
    assert "frame-ancestors 'none'" in fields["content-security-policy"]


def test_the_docs_page_assets_come_from_the_api(stack: Stack) -> None:
    page = requests.get(f"{stack.url}/docs", timeout=10)
    assert page.status_code == 200 and "https://" not in page.text and "http://" not in page.text
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    assets = re.findall(r'(?:src|href)="(/docs/assets/[^"]+)"', page.text)
    assert len(assets) == 4
    types = {"js": "text/javascript", "css": "text/css", "png": "image/png"}
    for url in assets:
        response = requests.get(f"{stack.url}{url}", timeout=10)
        assert response.status_code == 200, url
        assert response.headers["Content-Type"].split(";")[0] == types[url.rsplit(".", 1)[1]]
        assert response.headers["X-Content-Type-Options"] == "nosniff"
    spec = requests.get(f"{stack.url}/openapi.json", timeout=10)
    assert spec.status_code == 200 and "/v1/sessions" in spec.json()["paths"]


def test_up_refuses_under_require_kvm_and_leaves_nothing(stack: Stack, tmp_path) -> None:
    """SHOAL_ACCEL=tcg with SHOAL_REQUIRE_KVM=1 is refused on every machine; whether this
    machine's KVM is usable is the unit tests' business (tests/unit/test_require_kvm.py)."""
    env = {
        **stack.env,
        "SHOAL_HOME": str(tmp_path),
        "SHOAL_REQUIRE_KVM": "1",
        "SHOAL_ACCEL": "tcg",
        "SHOAL_PORT": "1",
        "SHOAL_TLS_PORT": "0",
    }
    up = subprocess.run(
        [*SHOAL, "up", "--detach"], env=env, cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert up.returncode == 1, up.stdout + up.stderr
    assert "failed to start worker: SHOAL_REQUIRE_KVM=1" in up.stderr
    assert "not a hardware isolation boundary" in up.stderr
    assert processes_of(str(tmp_path)) == []
