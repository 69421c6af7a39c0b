"""The noisy_neighbour benchmark scenario's own logic: sizing tenant A's flood, reading the
answers A gets, A's request thread against a loopback server, and the goals of its report."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest

from shoal.bench import report
from shoal.bench.core import BenchSkipped
from shoal.bench.neighbour_load import (
    FLOOD_MARGIN,
    OVER_RATE,
    Neighbour,
    outcome,
    size_flood,
    sleep_body,
)
from shoal.bench.neighbours import Phase, noisy_neighbour, results
from shoal.settings import Settings


def test_the_flood_outnumbers_the_default_worker_threads_by_the_margin() -> None:
    threads = Settings().worker_threads  # 48 VMs + 16 spare
    flood = size_flood(threads)
    assert flood.need == threads + FLOOD_MARGIN == 72
    assert (flood.sessions, flood.per_session, flood.total) == (4, 18, 72)


@pytest.mark.parametrize(
    ("threads", "sessions", "per_session", "total"),
    [(12, 4, 5, 20), (13, 4, 6, 24), (1, 1, 9, 9), (64, 5, 15, 75), (100, 3, 36, 108)],
)
def test_the_flood_is_the_smallest_even_spread_reaching_its_need(
    threads: int, sessions: int, per_session: int, total: int
) -> None:
    flood = size_flood(threads, sessions)
    assert (flood.per_session, flood.total) == (per_session, total)
    assert flood.total >= threads + FLOOD_MARGIN > flood.total - sessions


@pytest.mark.parametrize(("threads", "sessions"), [(0, 4), (64, 0), (-1, 1)])
def test_a_flood_of_nothing_is_refused(threads: int, sessions: int) -> None:
    with pytest.raises(ValueError):
        size_flood(threads, sessions)


def test_answers_are_told_apart_by_status_and_error_code() -> None:
    refused = json.dumps({"error": {"code": "RateLimited", "message": "slow down"}}).encode()
    assert outcome(202, b'{"id": "e1"}') == "accepted"
    assert outcome(200, b"") == "accepted"
    assert outcome(429, refused) == "RateLimited"
    assert outcome(502, b"<html>bad gateway</html>") == "HTTP 502"
    assert outcome(500, b'{"error": "flat"}') == "HTTP 500"
    assert outcome(404, b'{"error": {"code": ""}}') == "HTTP 404"


def test_a_sleeping_execution_ends_before_its_timeout_would_cut_it() -> None:
    body = sleep_body(220)
    assert body == {"code": "import time; time.sleep(210)", "wait": False, "timeout_s": 220}
    assert sleep_body(5)["code"].endswith("time.sleep(1)")


class _Bucket(BaseHTTPRequestHandler):
    """Accepts the first `free` executions, then answers 429 RateLimited or, every other
    time, TooManyPendingExecutions."""

    free = 3
    seen: Counter[str] = Counter()
    lock = threading.Lock()

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers["Content-Length"]))
        with self.lock:
            self.seen[self.path] += 1
            n = sum(self.seen.values())
        if n <= self.free:
            status, body = 202, {"id": f"e{n}"}
        else:
            code = "RateLimited" if n % 2 else "TooManyPendingExecutions"
            status, body = 429, {"error": {"code": code, "message": "no"}}
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *_args: object) -> None:
        pass


def test_tenant_a_sends_at_its_limit_and_counts_what_it_gets() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Bucket)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        b = SimpleNamespace(
            url=f"http://127.0.0.1:{server.server_port}",
            settings=SimpleNamespace(max_timeout_s=60),
        )
        rate = 40.0
        a = Neighbour(b, "sk_test", size_flood(4, sessions=2), rate)
        a.session_ids = ["s1", "s2"]
        a.start_load()
        time.sleep(1.0)
        a.stop_load()
    finally:
        server.shutdown()
        server.server_close()
    sent = sum(a.load_tally.values())
    assert 0.7 * rate * OVER_RATE <= sent / a.load_s <= 1.2 * rate * OVER_RATE
    assert a.load_tally["accepted"] == 3
    assert a.load_tally["RateLimited"] + a.load_tally["TooManyPendingExecutions"] == sent - 3
    # In turn over A's sessions, as the flood's top-ups.
    paths = _Bucket.seen
    assert set(paths) == {"/v1/sessions/s1/executions", "/v1/sessions/s2/executions"}
    assert abs(paths["/v1/sessions/s1/executions"] - paths["/v1/sessions/s2/executions"]) <= 1


def _phase(name: str, warm: list[float], starts: list[float], failures: int = 0) -> Phase:
    phase = Phase(name)
    phase.warm, phase.starts = warm, starts
    phase.failures = [f"warm execution: BenchError: {i}" for i in range(failures)]
    return phase


def _report(loaded: Phase, unfinished: list[int]) -> dict[str, dict]:
    a = SimpleNamespace(
        load_tally=Counter(accepted=2, RateLimited=30, TooManyPendingExecutions=170),
        load_s=3.2,
        fill_tally=Counter(accepted=72),
    )
    quiet = _phase("quiet", [10.0, 11.0, 12.0], [60.0, 70.0, 80.0])
    made = results(quiet, loaded, a, size_flood(64), 64, (50.0, 100), unfinished)
    built = report.build(made, {}, {})
    return {row["name"]: row for row in built["results"]}


def test_the_report_judges_b_against_its_own_quiet_figures() -> None:
    rows = _report(_phase("loaded", [13.0, 16.0, 30.0], [100.0, 105.0, 400.0]), [72, 73, 72])
    warm = rows["noisy_loaded_warm"]
    assert warm["summary"]["ratios"] == {"noisy_quiet_warm": 1.45}
    assert [g["met"] for g in warm["goals"]] == [True]
    start = rows["noisy_loaded_new_session"]
    assert start["summary"]["ratios"] == {"noisy_quiet_new_session": 1.5}
    assert [g["met"] for g in start["goals"]] == [True]
    assert rows["noisy_b_failed"]["summary"]["value"] == 0
    assert [g["met"] for g in rows["noisy_b_failed"]["goals"]] == [True]
    assert rows["noisy_a_unfinished"]["summary"]["value"] == 72
    assert [g["met"] for g in rows["noisy_a_unfinished"]["goals"]] == [True]
    assert rows["noisy_a_rate"]["summary"]["value"] == pytest.approx(202 / 3.2, abs=0.01)
    assert [g["met"] for g in rows["noisy_a_rate"]["goals"]] == [True]
    assert rows["noisy_a_429"]["summary"]["value"] == 200


def test_a_slower_or_failing_b_and_a_thin_flood_are_not_met() -> None:
    rows = _report(_phase("loaded", [17.0, 18.0], [130.0], failures=2), [71, 75])
    assert [g["met"] for g in rows["noisy_loaded_warm"]["goals"]] == [False]
    assert [g["met"] for g in rows["noisy_loaded_new_session"]["goals"]] == [False]
    assert rows["noisy_b_failed"]["summary"]["value"] == 2
    assert [g["met"] for g in rows["noisy_b_failed"]["goals"]] == [False]
    assert [g["met"] for g in rows["noisy_a_unfinished"]["goals"]] == [False]


def test_without_a_second_key_an_instance_given_by_url_is_skipped_saying_what_it_needs() -> None:
    b = SimpleNamespace(
        private=False,
        options=SimpleNamespace(neighbour_key="", calls=0),
        settings=Settings(redis_url="redis://127.0.0.1:1/0"),  # nothing listens there
        quick=True,
        size=lambda quick, full: quick,
    )
    with pytest.raises(BenchSkipped, match="--neighbour-key KEY .*--max-pending 72"):
        noisy_neighbour(b)


def test_a_skipped_scenario_is_listed_under_the_table_not_as_a_failure() -> None:
    table = report.text_table(
        {"results": [], "errors": {}, "skipped": {"noisy_neighbour": "needs --neighbour-key"}}
    )
    assert "noisy_neighbour: skipped: needs --neighbour-key" in table
    assert "FAILED" not in table
