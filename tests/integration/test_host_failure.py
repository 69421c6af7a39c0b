"""A worker that dies: /healthz names it, its executions end `lost`, and it rejoins on restart."""

from __future__ import annotations

import os
import signal
import time

import requests

from shoal.ops import processes
from shoal.settings import load
from tests.integration.conftest import Stack


def wait_until(check, timeout_s: float, interval_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"condition not met within {timeout_s} s")


def test_killed_worker_is_reported_its_execution_lost_and_it_rejoins(stack: Stack) -> None:
    settings = load(stack.env)
    session_id = stack.new_session()
    running = stack.execute(session_id, "import time; time.sleep(60)", wait=False)
    assert running["status"] in ("queued", "running")
    wait_until(
        lambda: (
            requests.get(
                f"{stack.url}/v1/executions/{running['id']}", headers=stack.headers(), timeout=5
            ).json()["status"]
            == "running"
        ),
        30,
    )

    pid = processes.running_pid(settings, "worker")
    os.killpg(pid, signal.SIGKILL)
    killed_at = time.monotonic()

    def health_names_worker():
        response = requests.get(f"{stack.url}/healthz", headers=stack.admin_headers(), timeout=5)
        return response.status_code == 503 and "worker testhost" in response.json()["down"]

    wait_until(health_names_worker, 30)
    assert time.monotonic() - killed_at < 30

    def execution_status():
        url = f"{stack.url}/v1/executions/{running['id']}"
        return requests.get(url, headers=stack.headers(), timeout=5).json()["status"]

    wait_until(lambda: execution_status() == "lost", 60)
    assert time.monotonic() - killed_at < 60
    session = requests.get(
        f"{stack.url}/v1/sessions/{session_id}", headers=stack.headers(), timeout=5
    ).json()
    assert session["state"] == "lost" and "testhost" in session["reason"]
    refused = requests.post(
        f"{stack.url}/v1/sessions/{session_id}/executions",
        json={"code": "1"},
        headers=stack.headers(),
        timeout=10,
    )
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "SessionLost"

    stack.shoal("up", "--detach")
    wait_until(lambda: requests.get(f"{stack.url}/healthz", timeout=5).status_code == 200, 60)
    # The restarted worker reconciled: the lost session's VM is gone, new sessions work.
    fresh = stack.new_session()
    assert stack.execute(fresh, "6 * 7")["result"]["text/plain"] == "42"
