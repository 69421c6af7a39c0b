"""One tenant flooding its sessions with long executions does not take the host from another.

The shared stack runs its host worker with SHOAL_WORKER_CONCURRENCY=12 (tests/integration/
conftest.py); tenant A queues more sleeping executions than that. Waiting executions hold no
worker thread (workers/session_queue.py), so tenant B still creates a session, executes and moves
files within seconds.
"""

from __future__ import annotations

import time

import requests

FLOOD_PER_SESSION = 10  # two sessions: 20 executions queued or running, more than 12 threads
QUICK_S = 15.0  # B's every step, with the host busy; the old design took minutes


def timed(call):
    started = time.monotonic()
    result = call()
    return result, time.monotonic() - started


def test_a_flooding_tenant_leaves_the_host_to_others(stack) -> None:
    key_a, key_b = stack.new_key("noisy-a"), stack.new_key("quiet-b")
    a_sessions = [stack.new_session(key_a) for _ in range(2)]
    flood = [
        stack.execute(sid, "import time; time.sleep(60)", key_a, wait=False, timeout_s=90)["id"]
        for sid in a_sessions
        for _ in range(FLOOD_PER_SESSION)
    ]
    time.sleep(1)  # the first of each session is running, the rest are queued on the host

    b, took = timed(lambda: stack.new_session(key_b))
    assert took < QUICK_S, f"creating a session took {took:.1f} s behind the flood"
    answer, took = timed(lambda: stack.execute(b, "6 * 7", key_b))
    assert answer["status"] == "succeeded" and answer["result"] == {"text/plain": "42"}
    assert took < QUICK_S
    headers = stack.headers(key_b)
    file_url = f"{stack.url}/v1/sessions/{b}/files/data.txt"
    upload, took = timed(lambda: requests.put(file_url, data=b"hello", headers=headers, timeout=60))
    assert upload.status_code in (200, 201), upload.text
    assert took < QUICK_S
    download, took = timed(lambda: requests.get(file_url, headers=headers, timeout=60))
    assert download.status_code == 200 and download.content == b"hello"
    assert took < QUICK_S

    statuses = [
        requests.get(
            f"{stack.url}/v1/executions/{e}", headers=stack.headers(key_a), timeout=30
        ).json()["status"]
        for e in flood
    ]
    assert statuses.count("running") == 2 and statuses.count("queued") == len(flood) - 2

    # Deleting A's sessions ends what ran and what waited; nothing stays queued.
    for sid in a_sessions:
        gone = requests.delete(
            f"{stack.url}/v1/sessions/{sid}", headers=stack.headers(key_a), timeout=60
        )
        assert gone.status_code == 204
    deadline = time.monotonic() + 30
    pending = list(flood)
    while pending and time.monotonic() < deadline:
        pending = [
            e
            for e in pending
            if requests.get(
                f"{stack.url}/v1/executions/{e}", headers=stack.headers(key_a), timeout=30
            ).json()["status"]
            in ("queued", "running")
        ]
        time.sleep(0.5)
    assert pending == [], f"{len(pending)} executions never ended after their session did"
    requests.delete(f"{stack.url}/v1/sessions/{b}", headers=headers, timeout=60)
