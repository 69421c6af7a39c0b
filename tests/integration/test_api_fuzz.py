"""API fuzzing generated from /openapi.json (schemathesis) against the shared stack, on both the
/v1 and the dynamic-sessions (/pools/{pool}/...) routes: no answer is a 5xx, every error is in
the one error shape ({"error": {"code", "message"}} with x-ms-error-code), and every answer
conforms to the document (status, content type, headers, body).

`st run` runs every operation through schemathesis' phases (the schema's examples, the coverage
phase's boundary and missing-value cases, generated positive and negative cases), from a fixed
seed so that a run can be repeated, with the hooks of tests/integration/fuzz_hooks.py: the
error-shape check, and the steering of each case at things that exist (the pool `default`, the
tenant's session, execution, batch and one identifier; invalid values go as generated).
schemathesis' checks for how strictly requests are validated (positive_data_acceptance,
negative_data_rejection) are not run: the dynamic-sessions routes answer as the reference
service does (an unknown identifier is a 400, for one), and /v1 takes a number with a fraction
where it documents an integer.

What the run may make stays bounded: it runs as a tenant of its own with small caps (at most
FUZZ_SESSIONS live sessions, i.e. VMs, a create beyond them is a 429; few unfinished executions
and waits), paced below the tenant's request rate so that its requests are answered rather than
refused. Callbacks reach nothing but loopback: the stack allows 127.0.0.1 besides public
addresses (SHOAL_WEBHOOK_ALLOW_HOSTS), and the hooks point every callback URL the API would call
at a loopback port where nothing listens. Timeouts asked for are cut to a few seconds.
Everything the run made is removed at the end (its batches cancelled, its sessions deleted), and
the run takes at most RUN_BUDGET_S.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import requests

from shoal import keys, redis_conn, tenants
from shoal.ops.stack import free_port
from shoal.settings import load
from tests.integration.conftest import REPO, Stack
from tests.integration.test_host_failure import wait_until

TENANT = "fuzz"
IDENTIFIER = "fuzz"
# The test holds two sessions (one /v1, one identifier): the run may make one more.
FUZZ_SESSIONS = 3
FUZZ_LIMITS = {"max_waits": 2, "max_pending": 4, "max_session_pending": 2, "rate": 50, "burst": 100}
CLIENT_RATE = "40/s"  # the run's own pace, below the tenant's rate
MAX_EXAMPLES = 20
SEED = 20261126
RUN_BUDGET_S = 180
CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
    "ignored_auth",  # every operation refuses a request without a valid key
    "unsupported_method",  # a method the path does not take is a 405
    "error_shape",  # fuzz_hooks.py
]


def _post(stack: Stack, key: str, route: str, **kwargs) -> requests.Response:
    return requests.post(f"{stack.url}{route}", headers=stack.headers(key), timeout=180, **kwargs)


def fuzz_state(stack: Stack, key: str) -> dict:
    """Things of the tenant's for the cases to name: a session with a finished execution, an
    identifier session, a finished batch (its one item is invalid); a callback URL on a
    loopback port where nothing listens."""
    session_id = stack.new_session(key)
    execution_id = stack.execute(session_id, "1 + 1", key=key)["id"]
    route = f"/pools/default/executions?identifier={IDENTIFIER}&api-version=2025-02-02-preview"
    made = _post(stack, key, route, json={"code": "1"})
    assert made.status_code == 200, made.text
    batch = _post(stack, key, "/v1/batches", json={"items": [{"nothing": 1}]})
    assert batch.status_code == 202, batch.text
    return {
        "session_id": session_id,
        "execution_id": execution_id,
        "batch_id": batch.json()["id"],
        "identifier": IDENTIFIER,
        "callback_url": f"http://127.0.0.1:{free_port()}/fuzz",
    }


def clean_up(stack: Stack, key: str, batch_ids: set[str], r) -> None:
    """Cancel the run's batches and delete every session of the tenant."""
    headers = stack.headers(key)
    for batch_id in sorted(batch_ids):
        with contextlib.suppress(requests.RequestException):
            requests.post(f"{stack.url}/v1/batches/{batch_id}/cancel", headers=headers, timeout=30)
    listed = requests.get(f"{stack.url}/v1/sessions", headers=headers, timeout=30)
    assert listed.status_code == 200, listed.text
    for entry in listed.json()["sessions"]:
        deleted = requests.delete(
            f"{stack.url}/v1/sessions/{entry['id']}", headers=headers, timeout=60
        )
        assert deleted.status_code in (204, 404), deleted.text
    wait_until(lambda: r.scard(keys.tenant_sessions(TENANT)) == 0, 60)


def run_schemathesis(stack: Stack, key: str, workdir: Path, state_file: Path, log_file: Path):
    """`st run` in `workdir` (where schemathesis and Hypothesis keep their caches), with the
    hooks of fuzz_hooks.py."""
    command = [
        sys.executable, "-m", "schemathesis.cli", "run", f"{stack.url}/openapi.json",
        "--header", f"Authorization: Bearer {key}",
        "--checks", ",".join(CHECKS),
        "--phases", "examples,coverage,fuzzing",
        "--mode", "all",
        "--max-examples", str(MAX_EXAMPLES),
        "--seed", str(SEED),
        "--no-shrink",
        "--generation-database", "none",
        "--workers", "1",
        "--rate-limit", CLIENT_RATE,
        "--request-timeout", "60",
        "--no-color",
    ]  # fmt: skip
    env = {
        **stack.env,
        "SCHEMATHESIS_HOOKS": "tests.integration.fuzz_hooks",
        "FUZZ_STATE": str(state_file),
        "FUZZ_LOG": str(log_file),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), stack.env.get("PYTHONPATH")])),
    }
    return subprocess.run(
        command, cwd=workdir, env=env, capture_output=True, text=True, timeout=RUN_BUDGET_S + 60
    )


def test_fuzzing_from_the_openapi_document_finds_no_5xx_and_no_answer_off_shape(
    stack: Stack, tmp_path: Path
) -> None:
    assert stack.env["SHOAL_WEBHOOK_ALLOW_HOSTS"] == "127.0.0.1"
    r = redis_conn.client(load(stack.env))
    key = stack.new_key(TENANT)
    tenants.set_max_sessions(r, TENANT, FUZZ_SESSIONS)
    tenants.set_limits(r, TENANT, **FUZZ_LIMITS)
    state_file, log_file = tmp_path / "state.json", tmp_path / "answers.jsonl"
    log_file.touch()
    state: dict = {}
    try:
        state = fuzz_state(stack, key)
        state_file.write_text(json.dumps(state))
        started = time.monotonic()
        run = run_schemathesis(stack, key, tmp_path, state_file, log_file)
        elapsed = time.monotonic() - started
    finally:
        answers = [json.loads(line) for line in log_file.read_text().splitlines()]
        batch_ids = {a["batch"] for a in answers if a["batch"]}
        clean_up(stack, key, batch_ids | ({state["batch_id"]} if state else set()), r)
    statuses: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for answer in answers:
        statuses[answer["operation"]][answer["status"]] += 1
    summary = "\n".join(f"  {op}: {dict(sorted(c.items()))}" for op, c in sorted(statuses.items()))
    print(f"fuzzing: {len(answers)} requests in {elapsed:.0f} s\n{summary}")
    assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-5000:]
    assert elapsed <= RUN_BUDGET_S, f"the fuzzing run took {elapsed:.0f} s"
    # Every operation of the document was exercised, /v1 and dynamic-sessions alike.
    spec = requests.get(f"{stack.url}/openapi.json", timeout=10).json()
    documented = {
        f"{method.upper()} {path}"
        for path, item in spec["paths"].items()
        for method in item
        if method != "parameters"
    }
    assert documented == set(statuses), documented ^ set(statuses)
    assert any(p.startswith("/pools/") for p in spec["paths"])
    for status in (s for c in statuses.values() for s in c):
        assert status < 500, summary
