"""Batches: good, failing, timing-out and invalid items, collect, an existing session, paging,
tenant scoping, cancel, isolation between items and a batch larger than the tenant's cap."""

from __future__ import annotations

import base64
import json
import threading

import requests
from standardwebhooks import Webhook

from tests.integration.conftest import Stack
from tests.integration.test_host_failure import wait_until
from tests.integration.test_webhooks import Receiver, receiver  # noqa: F401  (fixture)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def post_batch(stack: Stack, key: str, **body) -> dict:
    response = requests.post(
        f"{stack.url}/v1/batches", json=body, headers=stack.headers(key), timeout=60
    )
    assert response.status_code == 202, response.text
    assert response.headers["Location"].endswith(response.json()["id"])
    return response.json()


def get_batch(stack: Stack, key: str, batch_id: str, **query) -> dict:
    response = requests.get(
        f"{stack.url}/v1/batches/{batch_id}", params=query, headers=stack.headers(key), timeout=30
    )
    assert response.status_code == 200, response.text
    return response.json()


def finished(stack: Stack, key: str, batch_id: str, timeout_s: float = 150) -> dict:
    return wait_until(
        lambda: (b := get_batch(stack, key, batch_id, limit=1000))["finished_at"] and b,
        timeout_s,
        0.5,
    )


WRITE_OUTPUTS = """
import json, os
rows = open('/mnt/data/in.csv').read().split(',')
os.makedirs('/mnt/data/out/deep', exist_ok=True)
json.dump(rows, open('/mnt/data/out/rows.json', 'w'))
open('/mnt/data/out/deep/not-collected.json', 'w').write('{}')
open('/mnt/data/plot.png', 'wb').write(b'\\x89PNG fake')
open('/mnt/data/notes.txt', 'w').write('not collected')
len(rows)
"""


def test_a_mixed_batch(stack: Stack, receiver: Receiver) -> None:  # noqa: F811
    key = stack.new_key("batcher")
    secret = stack.shoal("keys", "webhook-secret", "--tenant", "batcher").stdout.strip()
    session_id = stack.new_session(key)
    assert stack.execute(session_id, "kept = 41", key=key)["status"] == "succeeded"
    items = [
        {"code": WRITE_OUTPUTS, "files": {"in.csv": b64(b"a,b,c")},
         "collect": ["*.png", "out/*.json"]},
        {"code": "raise ValueError('boom')"},
        {"code": "import time; time.sleep(60)", "timeout_s": 2},
        {"language": "python"},
        {"code": "1", "files": {"x.bin": "not base64!"}},
        {"code": "echo from shell", "language": "shell"},
        {"code": "kept + 1", "session_id": session_id},
    ]  # fmt: skip
    created = post_batch(stack, key, items=items, max_parallel=4, callback_url=receiver.url)
    assert created["status"] == "running" and created["total"] == 7
    assert created["counts"]["invalid"] == 2
    batch = finished(stack, key, created["id"])
    assert batch["status"] == "completed"
    statuses = [i["status"] for i in batch["items"]]
    assert statuses == [
        "succeeded", "failed", "timed_out", "invalid", "invalid", "succeeded", "succeeded"
    ]  # fmt: skip
    good, failing, slow, no_code, bad_file, shell, existing = batch["items"]
    assert good["execution"]["result"] == {"text/plain": "3"}
    assert {k: base64.b64decode(v) for k, v in good["files"].items()} == {
        "plot.png": b"\x89PNG fake",
        "out/rows.json": b'["a", "b", "c"]',
    }
    assert failing["execution"]["error"]["name"] == "ValueError" and failing["error"] is None
    assert slow["execution"]["status"] == "timed_out"
    assert "code" in no_code["error"] and no_code["execution"] is None
    assert "base64" in bad_file["error"]
    assert shell["execution"]["stdout"] == "from shell\n"
    assert existing["execution"]["result"] == {"text/plain": "42"}
    assert existing["execution"]["session_id"] == session_id
    assert batch["counts"] == {"failed": 1, "invalid": 2, "succeeded": 3, "timed_out": 1}
    # The named session is still there; the batch's own sessions are gone.
    sessions = requests.get(f"{stack.url}/v1/sessions", headers=stack.headers(key), timeout=10)
    assert [s["id"] for s in sessions.json()["sessions"]] == [session_id]

    # Paging and filtering.
    page = get_batch(stack, key, created["id"], limit=3)
    assert [i["index"] for i in page["items"]] == [0, 1, 2] and page["next_cursor"]
    rest = get_batch(stack, key, created["id"], limit=3, cursor=page["next_cursor"])
    assert [i["index"] for i in rest["items"]] == [3, 4, 5]
    invalid = get_batch(stack, key, created["id"], status="invalid")
    assert [i["index"] for i in invalid["items"]] == [3, 4] and invalid["next_cursor"] is None

    # The batch's webhook: signed, the batch object, delivered once.
    [got] = receiver.wait_for(1)
    payload = Webhook(secret).verify(got["body"], got["headers"])
    assert payload["id"] == created["id"] and payload["status"] == "completed"
    assert payload["counts"] == batch["counts"] and len(payload["items"]) == 7
    webhook = wait_until(
        lambda: (
            (w := get_batch(stack, key, created["id"])["webhook"])["status"] == "delivered" and w
        ),
        30,
        0.2,
    )
    assert webhook["attempts"][0]["status_code"] == 200

    # Another tenant does not see it.
    other = requests.get(
        f"{stack.url}/v1/batches/{created['id']}", headers=stack.headers(), timeout=10
    )
    assert other.status_code == 404 and other.json()["error"]["code"] == "BatchNotFound"
    requests.delete(f"{stack.url}/v1/sessions/{session_id}", headers=stack.headers(key), timeout=30)


ISOLATED = """
import os
seen = [p for p in os.listdir('/mnt/data') if p == 'left-behind.txt']
seen += [n for n in ('marker',) if n in globals()]
open('/mnt/data/left-behind.txt', 'w').write('x')
marker = 1
seen
"""


def test_items_are_isolated_and_a_batch_larger_than_the_cap_finishes(stack: Stack) -> None:
    key = stack.new_key("capped")
    stack.shoal("keys", "max-sessions", "--tenant", "capped", "1")
    most, stop = [0], threading.Event()

    def watch() -> None:
        while not stop.is_set():
            listed = requests.get(
                f"{stack.url}/v1/sessions", headers=stack.headers(key), timeout=10
            )
            most[0] = max(most[0], len(listed.json()["sessions"]))
            stop.wait(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        created = post_batch(stack, key, items=[{"code": ISOLATED}] * 4, max_parallel=8)
        batch = finished(stack, key, created["id"], 120)
    finally:
        stop.set()
        watcher.join()
    assert batch["counts"] == {"succeeded": 4}, batch
    # Each item ran after another in a fresh session and saw none of its files or variables.
    for item in batch["items"]:
        assert item["execution"]["result"] == {"text/plain": "[]"}, item
    assert most[0] == 1


def test_cancel_ends_running_and_pending_items(stack: Stack) -> None:
    key = stack.new_key("canceller")
    items = [{"code": "import time; time.sleep(100)", "timeout_s": 120}] * 5
    created = post_batch(stack, key, items=items, max_parallel=2)

    def two_running() -> bool:
        batch = get_batch(stack, key, created["id"])
        running = [
            i for i in batch["items"]
            if i["execution"] and i["execution"]["status"] == "running"
        ]  # fmt: skip
        return len(running) == 2

    wait_until(two_running, 60, 0.2)
    response = requests.post(
        f"{stack.url}/v1/batches/{created['id']}/cancel", headers=stack.headers(key), timeout=30
    )
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    batch = finished(stack, key, created["id"], 60)
    assert batch["status"] == "cancelled"
    assert batch["counts"] == {"cancelled": 5}, json.dumps(batch["items"])[:2000]
    ran = [i for i in batch["items"] if i["execution"]]
    assert len(ran) == 2 and all(i["execution"]["status"] == "cancelled" for i in ran)


def test_collected_files_are_bounded_and_the_cut_is_flagged(stack: Stack) -> None:
    key = stack.new_key("collect-bound")
    four_mib = "open(f'/mnt/data/part{i}.bin', 'wb').write(bytes([i]) * (4 << 20))"
    code = f"for i in range(3):\n    {four_mib}\n"  # 12 MiB against 10 MiB per item
    batch = post_batch(stack, key, items=[{"code": code, "collect": ["*.bin"]}], max_parallel=1)
    (item,) = finished(stack, key, batch["id"])["items"]
    assert item["status"] == "succeeded", item
    kept = {path: base64.b64decode(data) for path, data in item["files"].items()}
    assert sorted(kept) == ["part0.bin", "part1.bin"]
    assert all(len(data) == 4 << 20 for data in kept.values())  # whole files, never a cut one
    assert item["files_truncated"] is True
    assert "part2.bin" in item["error"] and "left out" in item["error"]
