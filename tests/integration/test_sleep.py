"""Sleeping sessions on real VMs (docs/api.md, "Sleeping sessions"), on the shared stack: a session
of a pool that sleeps is saved to disk at its cooldown and woken by the next request with its
variables, files and working directory as they were, its clock set; a session put to sleep by
hand survives a worker restart, is answered 503 while its host is down, and is woken through its
dynamic-sessions identifier on both API generations; deleting it leaves no image on disk.
"""

from __future__ import annotations

import os
import signal
import time

import requests

from shoal.ops import processes
from shoal.settings import load
from tests.integration.conftest import Stack
from tests.integration.test_dynamic_routes import LEGACY, Pool
from tests.integration.test_host_failure import wait_until


def view(stack: Stack, session_id: str) -> dict:
    response = requests.get(
        f"{stack.url}/v1/sessions/{session_id}", headers=stack.headers(), timeout=10
    )
    assert response.status_code == 200, response.text
    return response.json()


def images(stack: Stack) -> list:
    return sorted((load(stack.env).instance_vm_dir / "sleeping").glob("*.save"))


def test_an_idle_session_sleeps_and_the_next_request_wakes_it_as_it_was(stack: Stack) -> None:
    session_id = stack.new_session(pool="sleepy")  # cooldown 3 s, on_idle = "sleep"
    setup = "import os\nx = 41\nos.chdir('/mnt/data')\nopen('kept.txt', 'w').write('kept')"
    assert stack.execute(session_id, setup)["status"] == "succeeded"
    uploaded = requests.put(
        f"{stack.url}/v1/sessions/{session_id}/files/up.txt",
        data=b"uploaded",
        headers=stack.headers(),
        timeout=60,
    )
    assert uploaded.status_code == 201, uploaded.text
    wait_until(lambda: view(stack, session_id)["state"] == "sleeping", 60)
    asleep = view(stack, session_id)
    assert asleep["slept_at"] <= asleep["sleep_expires_at"] == asleep["expires_at"]
    (image,) = images(stack)
    st = image.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o600)
    assert (image.parent.stat().st_mode & 0o777) == 0o700

    time.sleep(2)  # the guest's clock must be set at wake, not resume 2 s behind
    started = time.monotonic()
    answer = stack.execute(
        session_id,
        "import time\nprint(x + 1, open('kept.txt').read(), open('up.txt').read(), os.getcwd())\n"
        "print(time.time())",
    )
    print(f"woken to first answer in {time.monotonic() - started:.2f} s")
    assert answer["status"] == "succeeded", answer
    state, guest_now = answer["stdout"].splitlines()
    assert state == "42 kept uploaded /mnt/data"
    assert abs(float(guest_now) - time.time()) < 5
    assert view(stack, session_id)["state"] == "active"
    assert not image.exists()
    requests.delete(f"{stack.url}/v1/sessions/{session_id}", headers=stack.headers(), timeout=60)


def test_a_sleeping_session_survives_a_worker_restart_and_its_identifier_wakes_it(
    stack: Stack,
) -> None:
    settings = load(stack.env)
    pool = Pool(stack, "sleeper-1")
    pool.base = f"{stack.url}/pools/napping"  # a pool that sleeps, but only when asked
    code = "y = 'kept'\nimport os\nos.makedirs('d', exist_ok=True)"
    body = {"properties": {"codeInputType": "inline", "executionType": "synchronous",
                           "code": code}}  # fmt: skip
    assert pool.request("POST", "code/execute", LEGACY, json=body).status_code == 200
    listed = requests.get(f"{stack.url}/v1/sessions", headers=stack.headers(), timeout=10).json()
    (session_id,) = [s["id"] for s in listed["sessions"] if s["identifier"] == "sleeper-1"]

    asked = requests.post(
        f"{stack.url}/v1/sessions/{session_id}/sleep", headers=stack.headers(), timeout=10
    )
    assert asked.status_code == 202 and asked.json()["id"] == session_id
    wait_until(lambda: view(stack, session_id)["state"] == "sleeping", 60)

    os.killpg(processes.running_pid(settings, "worker"), signal.SIGKILL)
    wait_until(
        lambda: "worker testhost" in requests.get(
            f"{stack.url}/healthz", headers=stack.admin_headers(), timeout=5
        ).json().get("down", ""),
        30,
    )  # fmt: skip
    refused = requests.post(
        f"{stack.url}/v1/sessions/{session_id}/executions",
        json={"code": "y"},
        headers=stack.headers(),
        timeout=10,
    )
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "SessionHostUnavailable"
    assert int(refused.headers["Retry-After"]) > 0
    assert view(stack, session_id)["state"] == "sleeping"  # kept, not lost

    stack.shoal("up", "--detach")
    wait_until(lambda: requests.get(f"{stack.url}/healthz", timeout=5).status_code == 200, 90)
    woken = pool.execute({"code": "import os\n(y, os.path.isdir('d'))"}).json()
    assert woken["status"] == "Succeeded", woken
    assert woken["result"]["executionResult"] == "('kept', True)"
    assert view(stack, session_id)["state"] == "active"

    again = requests.post(
        f"{stack.url}/v1/sessions/{session_id}/sleep", headers=stack.headers(), timeout=10
    )
    assert again.status_code == 202
    wait_until(lambda: view(stack, session_id)["state"] == "sleeping", 60)
    assert len(images(stack)) == 1
    legacy = {"properties": {"codeInputType": "inline", "executionType": "synchronous",
                             "code": "print(y)"}}  # fmt: skip
    woken = pool.request("POST", "code/execute", LEGACY, json=legacy)
    assert woken.status_code == 200 and woken.json()["properties"]["stdout"] == "kept\n"
    url = f"{stack.url}/v1/sessions/{session_id}/sleep"
    assert requests.post(url, headers=stack.headers(), timeout=10).status_code == 202
    wait_until(lambda: view(stack, session_id)["state"] == "sleeping", 60)
    gone = requests.delete(
        f"{stack.url}/v1/sessions/{session_id}", headers=stack.headers(), timeout=60
    )
    assert gone.status_code == 204
    wait_until(lambda: images(stack) == [], 30)
    left = list((settings.instance_vm_dir / "sleeping").iterdir())
    assert left == [], left


def test_a_session_asleep_past_its_retention_is_deleted_with_its_image(stack: Stack) -> None:
    session_id = stack.new_session(pool="fleeting")  # asleep 2 s after its last use, kept 4 s
    assert stack.execute(session_id, "x = 1")["status"] == "succeeded"
    wait_until(lambda: view(stack, session_id)["state"] == "sleeping", 60)
    assert len(images(stack)) == 1

    def expired() -> bool:
        response = requests.get(
            f"{stack.url}/v1/sessions/{session_id}", headers=stack.headers(), timeout=10
        )
        return response.status_code == 404 and response.json()["error"]["code"] == "SessionExpired"

    wait_until(expired, 60)
    wait_until(lambda: images(stack) == [], 30)


def test_a_pool_that_does_not_sleep_refuses_to(stack: Stack) -> None:
    session_id = stack.new_session()
    refused = requests.post(
        f"{stack.url}/v1/sessions/{session_id}/sleep", headers=stack.headers(), timeout=10
    )
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "SleepNotEnabled"
    requests.delete(f"{stack.url}/v1/sessions/{session_id}", headers=stack.headers(), timeout=60)
