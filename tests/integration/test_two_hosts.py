"""Two worker hosts on one Redis: placement on both, routing, failover, reconcile on rejoin.

The second host is a second worker process on this machine with its own host name (so its own
queue and domain-name prefix), sharing the test instance's Redis and libvirtd.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys

import requests

from shoal import keys, redis_conn
from shoal.settings import load
from tests.integration.conftest import REPO, Stack
from tests.integration.test_host_failure import wait_until
from workers.vm import VMManager

SECOND = "testhost2"


def start_second_worker(stack: Stack) -> subprocess.Popen:
    env = {**stack.env, "SHOAL_HOST_NAME": SECOND}
    log = open(stack.home / "logs" / f"worker-{SECOND}.log", "ab")  # noqa: SIM115
    argv = [sys.executable, "-m", "celery", "-A", "workers.worker_app", "worker",
            "-Q", f"shoal.host.{SECOND}", "-P", "threads", "-c", "8", "-n", f"{SECOND}@test",
            "--without-gossip", "--without-mingle"]  # fmt: skip
    return subprocess.Popen(
        argv, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def health(stack: Stack) -> dict:
    return requests.get(f"{stack.url}/healthz", headers=stack.admin_headers(), timeout=10).json()


def session(stack: Stack, session_id: str) -> dict:
    url = f"{stack.url}/v1/sessions/{session_id}"
    return requests.get(url, headers=stack.headers(), timeout=10).json()


def second_domains(stack: Stack) -> list[str]:
    settings = load(stack.env)
    names = subprocess.run(
        ["virsh", "-c", "qemu:///system", "list", "--all", "--name"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    return [n for n in names if n.startswith(f"shoal-{settings.instance_id}-{SECOND}-")]


def test_two_hosts_share_the_work_and_survive_one_dying(stack: Stack) -> None:
    settings = load(stack.env)
    r = redis_conn.client(settings)
    worker = start_second_worker(stack)
    try:
        wait_until(lambda: health(stack)["workers"].get(SECOND, {}).get("up"), 60)
        wait_until(
            lambda: requests.get(f"{stack.url}/v1/pools/default", headers=stack.headers(),
                                 timeout=10).json()["hosts"].get(SECOND, {}).get("ready", 0) > 0,
            120,
        )  # fmt: skip
        placed: dict[str, list[str]] = {}
        for _ in range(6):
            session_id = stack.new_session()
            placed.setdefault(session(stack, session_id)["host"], []).append(session_id)
            if len(placed) == 2:
                break
        assert set(placed) == {"testhost", SECOND}, placed
        for ids in placed.values():
            for session_id in ids:
                answer = stack.execute(session_id, "open('/run/shoal/identity').read()")
                assert answer["status"] == "succeeded", answer
        on_second = placed[SECOND][0]
        assert stack.execute(on_second, "y = 5")["status"] == "succeeded"
        assert stack.execute(on_second, "y * 2")["result"]["text/plain"] == "10"

        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
        wait_until(lambda: session(stack, on_second)["state"] == "lost", 60)
        assert SECOND in session(stack, on_second)["reason"]
        for _ in range(2):
            assert session(stack, stack.new_session())["host"] == "testhost"
        assert stack.execute(placed["testhost"][0], "1")["status"] == "succeeded"

        leftover = second_domains(stack)
        assert leftover, "the killed host's VMs should still exist until it reconciles"
        worker = start_second_worker(stack)
        wait_until(lambda: health(stack)["workers"].get(SECOND, {}).get("up"), 60)
        # Rejoined: the lost sessions' VMs are destroyed; only fresh ready VMs remain.
        wait_until(lambda: not set(leftover) & set(second_domains(stack)), 60)
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
        second = dataclasses.replace(settings, host_name=SECOND)
        VMManager(second).destroy_all()
        r.srem(keys.hosts(), SECOND)
        r.delete(keys.host_heartbeat(SECOND))
    assert second_domains(stack) == []
    wait_until(lambda: requests.get(f"{stack.url}/healthz", timeout=10).status_code == 200, 30)
