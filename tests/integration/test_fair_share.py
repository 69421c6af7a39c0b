"""Fair share between tenants on the shared stack (docs/limits.md, "Tenants"): tenant A, given
small limits of its own (the stack's defaults stay as they are for every other test), gets 429s
with Retry-After for its excess requests, sessions, unfinished executions and waits; its
concurrent creates never exceed its cap; and tenant B meanwhile creates a session and executes
within seconds.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
import time

import pytest
import requests

from shoal import keys, redis_conn, tenants
from shoal.settings import load
from tests.integration.conftest import Stack
from tests.integration.test_host_failure import wait_until

# Tenant A's own limits: small enough to reach with a handful of requests.
A_SESSIONS = 2
A_WAITS = 2
A_SESSION_PENDING = 2
A_PENDING = 3
# B's session and first execution, while A holds everything it may.
B_WITHIN_S = 20
SLEEP = "import time; time.sleep(30)"


def assert_429(response: requests.Response, code: str) -> int:
    """The one error shape, the code and a Retry-After of at least a second; returns it."""
    assert response.status_code == 429, (response.status_code, response.text)
    error = response.json()["error"]
    assert set(error) == {"code", "message"} and error["code"] == code, error
    assert response.headers["x-ms-error-code"] == code
    retry_after = int(response.headers["Retry-After"])
    assert retry_after >= 1
    return retry_after


@pytest.fixture(scope="module")
def r(stack: Stack):
    return redis_conn.client(load(stack.env))


def tenant_with_limits(stack: Stack, r, tenant: str, **limits: float) -> str:
    key = stack.new_key(tenant)
    tenants.set_max_sessions(r, tenant, A_SESSIONS)
    tenants.set_limits(r, tenant, **limits)
    return key


def post_session(stack: Stack, key: str) -> requests.Response:
    return requests.post(
        f"{stack.url}/v1/sessions",
        json={"pool": "default"},
        headers=stack.headers(key),
        timeout=180,
    )


def post_execution(stack: Stack, key: str, session_id: str, code: str, wait: bool):
    return requests.post(
        f"{stack.url}/v1/sessions/{session_id}/executions",
        json={"code": code, "wait": wait, "timeout_s": 60},
        headers=stack.headers(key),
        timeout=120,
    )


def clean_up(stack: Stack, key: str, execution_ids: list[str], session_ids: list[str]) -> None:
    """Cancel A's sleeping executions and delete its sessions: the stack is shared."""
    for execution_id in execution_ids:
        with contextlib.suppress(requests.RequestException):
            requests.post(
                f"{stack.url}/v1/executions/{execution_id}/cancel",
                headers=stack.headers(key),
                timeout=10,
            )
    for session_id in session_ids:
        with contextlib.suppress(requests.RequestException):
            requests.delete(
                f"{stack.url}/v1/sessions/{session_id}", headers=stack.headers(key), timeout=30
            )


def test_excess_requests_get_429_with_retry_after_and_another_tenant_is_not_slowed(
    stack: Stack, r
) -> None:
    rate, burst = 0.5, 5  # a token every 2 s
    a = tenant_with_limits(stack, r, "fair-rate-a", rate=rate, burst=burst)
    b = stack.new_key("fair-rate-b")
    started = time.monotonic()
    answers = [
        requests.get(f"{stack.url}/v1/sessions", headers=stack.headers(a), timeout=10)
        for _ in range(12)
    ]
    elapsed = time.monotonic() - started
    assert [x.status_code for x in answers[:burst]] == [200] * burst
    served = [x for x in answers if x.status_code == 200]
    assert len(served) <= burst + int(elapsed * rate) + 1, [x.status_code for x in answers]
    refused = [x for x in answers if x.status_code != 200]
    assert refused
    retry_after = max(assert_429(x, "RateLimited") for x in refused)
    assert retry_after <= 2
    # B is not limited by A's bucket.
    for _ in range(12):
        listed = requests.get(f"{stack.url}/v1/sessions", headers=stack.headers(b), timeout=10)
        assert listed.status_code == 200, listed.text
    # After Retry-After, A is served again.
    time.sleep(retry_after)
    again = requests.get(f"{stack.url}/v1/sessions", headers=stack.headers(a), timeout=10)
    assert again.status_code == 200, again.text


def test_concurrent_creates_never_exceed_the_tenants_cap(stack: Stack, r) -> None:
    a = tenant_with_limits(stack, r, "fair-cap-a")
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: post_session(stack, a), range(6)))
    made = [x.json()["id"] for x in answers if x.status_code == 201]
    try:
        assert len(made) == A_SESSIONS, [(x.status_code, x.text[:200]) for x in answers]
        for refused in (x for x in answers if x.status_code != 201):
            assert_429(refused, "TenantSessionLimit")
        listed = requests.get(f"{stack.url}/v1/sessions", headers=stack.headers(a), timeout=10)
        assert len(listed.json()["sessions"]) == A_SESSIONS
        assert r.scard(keys.tenant_sessions("fair-cap-a")) == A_SESSIONS
    finally:
        clean_up(stack, a, [], made)


def test_a_tenant_at_every_cap_does_not_keep_another_from_working(stack: Stack, r) -> None:
    a = tenant_with_limits(
        stack,
        r,
        "fair-flood-a",
        max_waits=A_WAITS,
        max_session_pending=A_SESSION_PENDING,
        max_pending=A_PENDING,
    )
    b = stack.new_key("fair-flood-b")
    sessions_a = [stack.new_session(a) for _ in range(A_SESSIONS)]
    execution_ids: list[str] = []
    waiters: list[threading.Thread] = []
    try:
        assert_429(post_session(stack, a), "TenantSessionLimit")

        # A holds every wait it may: requests with wait true on sleeping executions.
        def hold(session_id: str) -> None:
            post_execution(stack, a, session_id, SLEEP, wait=True)

        for session_id in sessions_a[:A_WAITS]:
            waiter = threading.Thread(target=hold, args=(session_id,), daemon=True)
            waiter.start()
            waiters.append(waiter)
        wait_until(lambda: r.zcard(keys.tenant_waits("fair-flood-a")) == A_WAITS, 30, 0.05)
        execution_ids += r.zrange(keys.tenant_executions("fair-flood-a"), 0, -1)
        assert_429(post_execution(stack, a, sessions_a[0], "1", wait=True), "TooManyWaits")

        # ... and every unfinished execution: per session, then per tenant.
        queued = post_execution(stack, a, sessions_a[0], SLEEP, wait=False)
        assert queued.status_code == 202, queued.text
        execution_ids.append(queued.json()["id"])
        refused = post_execution(stack, a, sessions_a[0], SLEEP, wait=False)
        assert_429(refused, "TooManyPendingExecutions")
        assert refused.json()["error"]["message"].startswith(f"session {sessions_a[0]} ")
        refused = post_execution(stack, a, sessions_a[1], SLEEP, wait=False)
        assert_429(refused, "TooManyPendingExecutions")
        assert refused.json()["error"]["message"].startswith("tenant 'fair-flood-a' ")

        # B, meanwhile, makes a session and runs code within seconds.
        started = time.monotonic()
        created = post_session(stack, b)
        assert created.status_code == 201, created.text
        session_b = created.json()["id"]
        ran = post_execution(stack, b, session_b, "1 + 1", wait=True)
        elapsed = time.monotonic() - started
        assert ran.status_code == 200, ran.text
        assert ran.json()["status"] == "succeeded" and ran.json()["result"] == {"text/plain": "2"}
        assert elapsed < B_WITHIN_S, f"tenant B waited {elapsed:.1f} s"
        clean_up(stack, b, [], [session_b])
    finally:
        clean_up(stack, a, execution_ids, sessions_a)
        for waiter in waiters:
            waiter.join(60)
    # Every slot came back as A's executions and waits ended.
    wait_until(lambda: r.zcard(keys.tenant_executions("fair-flood-a")) == 0, 30)
    assert r.zcard(keys.tenant_waits("fair-flood-a")) == 0
