"""Warm pools, acquisition, pool caps, idle expiry, lifetime, usage and the single-beat lease,
against the test instance's pools (tests/integration/pools.toml)."""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys
import time

import requests

from shoal import keys, redis_conn
from shoal.settings import load
from tests.integration.conftest import REPO, Stack
from tests.integration.test_host_failure import wait_until


def pool_counts(stack: Stack, pool: str) -> dict:
    response = requests.get(f"{stack.url}/v1/pools/{pool}", headers=stack.headers(), timeout=10)
    assert response.status_code == 200, response.text
    return response.json()["counts"]


def settled_busy(stack: Stack, pool: str) -> int:
    """The pool's busy count once the host's heartbeat (every second here) has caught up with
    sessions that earlier tests ended just before: two reads a heartbeat apart agree."""
    seen = [pool_counts(stack, pool)["busy"]]

    def agrees() -> bool:
        time.sleep(1.2)
        seen.append(pool_counts(stack, pool)["busy"])
        return seen[-1] == seen[-2]

    wait_until(agrees, 15, 0)
    return seen[-1]


def test_pools_are_listed_with_settings_and_counts(stack: Stack) -> None:
    response = requests.get(f"{stack.url}/v1/pools", headers=stack.headers(), timeout=10)
    pools = {p["name"]: p for p in response.json()["pools"]}
    assert {"default", "race", "tiny", "brief"} <= set(pools)
    assert pools["race"]["ready_target"] == 2 and pools["race"]["ready_max"] == 3
    assert pools["tiny"]["max_sessions"] == 1
    assert pools["default"]["network"] is False
    assert "testhost" in pools["default"]["hosts"]


def test_a_ready_vm_is_taken_and_the_pool_refills(stack: Stack) -> None:
    wait_until(lambda: pool_counts(stack, "default")["ready"] == 2, 120)
    busy_before = settled_busy(stack, "default")
    session_id = stack.new_session()
    # Counts come from the hosts' heartbeats, which a host refreshes at once on acquisition.
    wait_until(lambda: pool_counts(stack, "default")["busy"] == busy_before + 1, 5, 0.1)
    assert stack.execute(session_id, "1 + 1")["result"]["text/plain"] == "2"
    wait_until(lambda: pool_counts(stack, "default")["ready"] == 2, 60)
    requests.delete(f"{stack.url}/v1/sessions/{session_id}", headers=stack.headers(), timeout=30)
    text = requests.get(f"{stack.url}/metrics", headers=stack.admin_headers(), timeout=10).text
    assert 'shoal_session_acquisitions_total{pool="default",source="ready"}' in text
    assert 'shoal_vms{host="testhost",pool="default",state="ready"} 2' in text
    assert "shoal_execution_seconds_bucket" in text


def test_concurrent_acquisitions_never_share_a_vm(stack: Stack) -> None:
    # A target of 2, and a third ready VM since the host has the memory for it (ready_max).
    wait_until(lambda: pool_counts(stack, "race")["ready"] == 3, 120)
    with concurrent.futures.ThreadPoolExecutor(max_workers=5) as pool:
        session_ids = list(pool.map(lambda _: stack.new_session(pool="race"), range(5)))
    assert len(set(session_ids)) == 5
    identities = []
    for session_id in session_ids:
        answer = stack.execute(session_id, "open('/run/shoal/identity').read()")
        assert answer["status"] == "succeeded", answer
        identities.append(answer["result"]["text/plain"])
    assert len(set(identities)) == 5, identities
    for session_id in session_ids:
        requests.delete(
            f"{stack.url}/v1/sessions/{session_id}", headers=stack.headers(), timeout=30
        )


def test_a_full_pool_refuses_clearly(stack: Stack) -> None:
    first = stack.new_session(pool="tiny")
    refused = requests.post(
        f"{stack.url}/v1/sessions", json={"pool": "tiny"}, headers=stack.headers(), timeout=60
    )
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "PoolExhausted"
    assert "tiny" in refused.json()["error"]["message"]
    dynamic = requests.post(
        f"{stack.url}/pools/tiny/code/execute",
        params={"identifier": "another", "api-version": "2024-02-02-preview"},
        json={"properties": {"code": "1"}},
        headers=stack.headers(),
        timeout=60,
    )
    assert dynamic.status_code == 404
    requests.delete(f"{stack.url}/v1/sessions/{first}", headers=stack.headers(), timeout=30)


def test_idle_sessions_expire_and_used_ones_live(stack: Stack) -> None:
    settings = load(stack.env)
    idle = stack.new_session(pool="brief")
    used = stack.new_session(pool="brief")
    started = time.monotonic()
    while time.monotonic() - started < 12:
        assert stack.execute(used, "1")["status"] == "succeeded"
        time.sleep(1.5)
    gone = requests.get(f"{stack.url}/v1/sessions/{idle}", headers=stack.headers(), timeout=10)
    assert gone.status_code == 404
    assert gone.json()["error"]["code"] == "SessionExpired"
    assert "expired" in gone.json()["error"]["message"]
    alive = requests.get(f"{stack.url}/v1/sessions/{used}", headers=stack.headers(), timeout=10)
    assert alive.status_code == 200 and alive.json()["state"] == "active"

    def vm_count() -> int:
        names = subprocess.run(
            ["virsh", "-c", "qemu:///system", "list", "--name"], capture_output=True, text=True
        ).stdout.split()
        return len([n for n in names if n.startswith(f"shoal-{settings.instance_id}-")])

    before = vm_count()
    # Left idle, the used session expires too, and its VM goes with it.
    wait_until(
        lambda: (
            requests.get(
                f"{stack.url}/v1/sessions/{used}", headers=stack.headers(), timeout=10
            ).status_code
            == 404
        ),
        20,
    )
    wait_until(lambda: vm_count() < before, 30)


def test_the_same_identifier_gets_a_fresh_session_after_expiry(stack: Stack) -> None:
    url = f"{stack.url}/pools/brief/code/execute"
    params = {"identifier": "conversation-7", "api-version": "2024-02-02-preview"}

    def run(code: str) -> dict:
        response = requests.post(
            url, params=params, json={"properties": {"code": code}}, headers=stack.headers(),
            timeout=120,
        )  # fmt: skip
        assert response.status_code == 200, response.text
        return response.json()["properties"]

    assert run("secret = 7")["status"] == "Success"
    assert run("secret")["result"] == 7
    time.sleep(12)
    fresh = run("'secret' in dir()")
    assert fresh["result"] is False


def test_usage_is_metered_in_session_seconds(stack: Stack) -> None:
    key = stack.new_key("metered")
    session_id = stack.new_session(key=key)
    time.sleep(1)
    requests.delete(f"{stack.url}/v1/sessions/{session_id}", headers=stack.headers(key), timeout=30)
    usage = requests.get(f"{stack.url}/v1/usage", headers=stack.headers(key), timeout=10).json()
    assert usage["tenant"] == "metered"
    assert usage["pools"]["default"]["session_seconds"] >= 1.0
    assert usage["pools"]["default"]["live_sessions"] == 0


def test_only_one_beat_acts_and_another_takes_over(stack: Stack) -> None:
    settings = load(stack.env)
    r = redis_conn.client(settings)
    holder = r.get(keys.beat_lock())
    assert holder
    second = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "workers.worker_app", "beat",
         "-S", "workers.beat:ShoalScheduler", "-s", str(stack.home / "second-beat-schedule")],
        env=stack.env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        time.sleep(6)
        assert r.get(keys.beat_lock()) == holder, "the second beat took the lease while held"
        from shoal.ops import processes

        first = processes.running_pid(settings, "beat")
        subprocess.run(["kill", "-9", str(first)], check=True)
        wait_until(lambda: r.get(keys.beat_lock()) not in (None, holder), 40)
        # The new holder does the housekeeping: an idle session of the brief pool expires.
        idle = stack.new_session(pool="brief")
        wait_until(
            lambda: (
                requests.get(
                    f"{stack.url}/v1/sessions/{idle}", headers=stack.headers(), timeout=10
                ).status_code
                == 404
            ),
            30,
        )
    finally:
        second.kill()
        second.wait()
        stack.shoal("up", "--detach")
