"""Redis memory shared fairly on the shared stack (docs/limits.md, "Storage"): tenant A, given a
1 MiB byte cap of its own, produces outputs until its next execution is refused with 429
TenantStorageFull; the result that took it past the cap is kept whole and A still reads and
deletes; tenant B meanwhile executes, the host's heartbeat stays fresh, and /healthz reports
Redis's memory, which the stack's private Redis bounds with maxmemory and never evicts.
"""

from __future__ import annotations

import json
import time

import pytest
import requests

from shoal import keys, redis_conn, storage, tenants
from shoal.settings import load
from tests.integration.conftest import Stack

A = "mem-cap-a"
B = "mem-cap-b"
OUTPUT = 400_000  # characters of stdout per execution: the third takes A past 1 MiB
CODE = f"print('x' * {OUTPUT}, end='')"
B_WITHIN_S = 20


@pytest.fixture(scope="module")
def r(stack: Stack):
    return redis_conn.client(load(stack.env))


def post_execution(stack: Stack, key: str, session_id: str, code: str) -> requests.Response:
    return requests.post(
        f"{stack.url}/v1/sessions/{session_id}/executions",
        json={"code": code, "wait": True, "max_output": OUTPUT},
        headers=stack.headers(key),
        timeout=120,
    )


def test_a_tenant_past_its_byte_cap_gets_429_while_another_goes_on(stack: Stack, r) -> None:
    a, b = stack.new_key(A), stack.new_key(B)
    tenants.set_limits(r, A, max_redis_mib=1)
    session_a, session_b = stack.new_session(a), stack.new_session(b)
    try:
        kept: list[dict] = []
        for _ in range(6):
            answer = post_execution(stack, a, session_a, CODE)
            if answer.status_code != 200:
                break
            body = answer.json()
            assert body["status"] == "succeeded" and len(body["stdout"]) == OUTPUT, body
            kept.append(body)
        assert answer.status_code == 429, (answer.status_code, answer.text)
        error = answer.json()["error"]
        assert set(error) == {"code", "message"} and error["code"] == "TenantStorageFull"
        assert answer.headers["x-ms-error-code"] == "TenantStorageFull"
        assert "SHOAL_TENANT_MAX_REDIS_MIB" in error["message"]
        # Room comes back when A's first record expires (records are kept a day).
        assert 3600 < int(answer.headers["Retry-After"]) <= 86400
        assert len(kept) == 3, [len(k["stdout"]) for k in kept]
        assert storage.held(r, A) > 1 << 20

        # The result that took A past its cap is kept whole; A still reads and deletes.
        last = requests.get(
            f"{stack.url}/v1/executions/{kept[-1]['id']}", headers=stack.headers(a), timeout=30
        )
        assert last.status_code == 200 and last.json()["stdout"] == "x" * OUTPUT

        # B is not held back, and the host's heartbeat stays fresh.
        started = time.monotonic()
        ran = post_execution(stack, b, session_b, "1 + 1")
        assert ran.status_code == 200 and ran.json()["result"] == {"text/plain": "2"}, ran.text
        assert time.monotonic() - started < B_WITHIN_S
        beat = json.loads(r.get(keys.host_heartbeat("testhost")))
        assert time.time() - beat["at"] < load(stack.env).heartbeat_ttl_s

        # /healthz: Redis's memory against its maxmemory, the tenants' bytes against their
        # share; a tenant at its cap is not an outage.
        health = requests.get(f"{stack.url}/healthz", headers=stack.admin_headers(), timeout=10)
        assert health.status_code == 200, health.text
        memory = health.json()["redis"]["memory"]
        settings = load(stack.env)
        assert memory["max_bytes"] == settings.redis_maxmemory_bytes > 0
        assert memory["policy"] == "noeviction" and memory["full"] is False
        assert 0 < memory["used_bytes"] < memory["max_bytes"]
        assert memory["tenants_max_bytes"] == settings.tenants_redis_bytes
        assert memory["tenants_bytes"] >= storage.held(r, A)
        assert memory["notes"] == []
        assert health.json()["workers"]["testhost"]["up"] is True
    finally:
        for key, session_id in ((a, session_a), (b, session_b)):
            deleted = requests.delete(
                f"{stack.url}/v1/sessions/{session_id}", headers=stack.headers(key), timeout=60
            )
            assert deleted.status_code in (200, 204), deleted.text
    # Its sessions gone, A's results still count until they expire: it is still refused.
    session_id = stack.new_session(a)  # a session holds nothing in Redis: not refused
    try:
        assert post_execution(stack, a, session_id, "1").status_code == 429
    finally:
        requests.delete(
            f"{stack.url}/v1/sessions/{session_id}", headers=stack.headers(a), timeout=60
        )
