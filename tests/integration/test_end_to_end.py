"""One execution through the whole path: HTTP -> Celery -> host worker -> VM -> agent -> back."""

from __future__ import annotations

import subprocess
from pathlib import Path

import requests

from tests.integration.conftest import Stack


def test_healthz_reports_every_part_up(stack: Stack) -> None:
    response = requests.get(f"{stack.url}/healthz", headers=stack.admin_headers(), timeout=10)
    assert response.status_code == 200, response.text
    report = response.json()
    assert report["redis"]["up"] and report["beat"]["up"]
    assert report["workers"]["testhost"]["up"]
    assert report["down"] == []


def test_print_runs_in_a_real_guest_and_state_persists(stack: Stack) -> None:
    session_id = stack.new_session()
    first = stack.execute(session_id, "print(1+1)\nx = 41")
    assert first["status"] == "succeeded", first
    assert first["stdout"] == "2\n"
    second = stack.execute(session_id, "x + 1")
    assert second["result"]["text/plain"] == "42"
    # The code ran inside the guest: its agent is there, and this host has none.
    where = stack.execute(session_id, "import os; os.path.exists('/opt/shoal/agent/agent.py')")
    assert where["result"]["text/plain"] == "True"
    assert not Path("/opt/shoal/agent/agent.py").exists()


def test_https_endpoint_serves_the_same_api(stack: Stack) -> None:
    ca = stack.home / "tls" / "ca.pem"
    response = requests.get(f"{stack.tls_url}/healthz", verify=str(ca), timeout=10)
    assert response.status_code == 200


def test_the_curl_line_that_up_prints_answers_2(stack: Stack) -> None:
    lines = stack.up_output.strip().splitlines()
    assert lines[-2] == "Run print(1+1) in a new session:"
    answer = subprocess.run(["bash", "-c", lines[-1]], capture_output=True, text=True, timeout=120)
    assert answer.stdout == "2\n", answer.stdout + answer.stderr
