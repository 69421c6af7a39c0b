"""What every scenario module uses: `Result`, `Goal`, `Scenario` and the `Bench` context.

A scenario returns `Result`s: latency samples (summarised as n, p50, p90, p99, mean) or one
value (a rate such as executions/s or MB/s). A result may name peers (results of `peers.py`) to
be shown with its ratio to them, and the goals of the issues it answers.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import requests

from shoal.bench import stats
from shoal.bench.lean_http import LeanClient

# Every request of the benchmark waits at most this long (an execution with wait true included).
REQUEST_TIMEOUT_S = 180
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class BenchError(Exception):
    """A scenario could not run; its message says why."""


class BenchSkipped(BenchError):
    """A scenario cannot run against this target (what it needs is missing); not a failure."""


@dataclass(frozen=True)
class Goal:
    """A target from an issue. `stat` is a summary field (p50, p99, value, ...) or
    `ratio:<peer>`; the figure must be <= `limit` (or >= when `at_least`)."""

    text: str
    stat: str
    limit: float
    at_least: bool = False
    issue: int | None = None

    def met(self, summary: dict[str, Any]) -> bool | None:
        figure = summary.get(self.stat)
        if self.stat.startswith("ratio:"):
            figure = summary.get("ratios", {}).get(self.stat.split(":", 1)[1])
        if figure is None:
            return None
        return figure >= self.limit if self.at_least else figure <= self.limit


@dataclass
class Result:
    name: str
    title: str
    unit: str = "ms"
    samples: list[float] = field(default_factory=list)
    value: float | None = None
    peers: tuple[str, ...] = ()
    goals: tuple[Goal, ...] = ()
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = stats.summarize(self.samples) if self.samples else {}
        if self.value is not None:
            out["value"] = round(self.value, 3)
            out.setdefault("n", self.extra.get("n", 1))
        return out

    def headline(self) -> float | None:
        """The figure compared with peers: p50 of samples, else the value."""
        summary = self.summary()
        return summary.get("p50", summary.get("value"))


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    run: Callable[[Bench], list[Result]]
    in_quick: bool = True
    opt_in: bool = False  # runs only when asked for (density)
    peer: bool = False


class Bench:
    """The run's context: the target instance, an HTTP client, sizes, progress output."""

    def __init__(
        self,
        url: str,
        key: str,
        quick: bool,
        settings: Any,
        options: Any,
        private: bool,
    ) -> None:
        host = urlparse(url).hostname or ""
        if host not in LOOPBACK:
            raise BenchError(f"the benchmark only runs against this machine (127.0.0.1), not {url}")
        self.url = url.rstrip("/")
        self.key = key
        self.quick = quick
        self.settings = settings  # of the target instance (logs, Redis, instance id)
        self.options = options
        self.private = private
        self.http = self.client()
        self.results: dict[str, Result] = {}
        self.health: dict[str, Any] = {}
        self._sessions: set[str] = set()
        self._lock = threading.Lock()
        self._local = threading.local()
        self.started_at = time.time()  # worker-log lines before this are not this run's

    # --- sizes and output --------------------------------------------------------------------
    def size(self, quick: int, full: int) -> int:
        return quick if self.quick else full

    def progress(self, message: str) -> None:
        print(f"bench: {message}", flush=True)

    # --- HTTP ----------------------------------------------------------------------------------
    def client(self) -> requests.Session:
        http = requests.Session()
        http.headers["Authorization"] = f"Bearer {self.key}"
        return http

    def request(
        self, method: str, path: str, http: requests.Session | None = None, **kw: Any
    ) -> requests.Response:
        kw.setdefault("timeout", REQUEST_TIMEOUT_S)
        return (http or self.http).request(method, self.url + path, **kw)

    def pools(self) -> dict[str, dict]:
        """The instance's pools (GET /v1/pools), by name."""
        answer = self.request("GET", "/v1/pools").json()
        return {p["name"]: p for p in answer.get("pools", [])}

    def new_session(self, http: requests.Session | None = None, pool: str = "default") -> str:
        response = self.request("POST", "/v1/sessions", http, json={"pool": pool})
        if response.status_code != 201:
            raise BenchError(f"POST /v1/sessions: {response.status_code} {response.text[:300]}")
        session_id = response.json()["id"]
        with self._lock:
            self._sessions.add(session_id)
        return session_id

    def delete_session(
        self, session_id: str, http: requests.Session | None = None
    ) -> requests.Response:
        response = self.request("DELETE", f"/v1/sessions/{session_id}", http)
        with self._lock:
            self._sessions.discard(session_id)
        return response

    def lean(self) -> LeanClient:
        """This thread's kept-alive client for timed executions (shoal/bench/lean_http.py)."""
        client = getattr(self._local, "lean", None)
        if client is None:
            client = self._local.lean = LeanClient(self.url, self.key, REQUEST_TIMEOUT_S)
        return client

    def execute(self, session_id: str, code: str) -> tuple[float, dict[str, Any], float, float]:
        """Run code with wait true: (round trip ms, the execution record, sent, received)
        where sent and received are this process's wall clock (time.time())."""
        sent = time.time()
        started = time.perf_counter()
        status, body = self.lean().post_json(
            f"/v1/sessions/{session_id}/executions", {"code": code}
        )
        ms = (time.perf_counter() - started) * 1000
        received = time.time()
        if status != 200:
            raise BenchError(f"execute: {status} {body[:300]!r}")
        record = json.loads(body)
        if record["status"] != "succeeded":
            raise BenchError(
                f"execute {code!r}: {record['status']}: {record.get('stderr', '')[-300:]}"
            )
        return ms, record, sent, received

    def cleanup(self) -> None:
        """Delete every session this run made and did not delete."""
        for session_id in list(self._sessions):
            with contextlib.suppress(requests.RequestException):
                self.delete_session(session_id)


def timed_loop(count: int, budget_s: float, step: Callable[[int], float]) -> list[float]:
    """Call step(i) up to `count` times or until `budget_s` passes; the samples it returns."""
    samples: list[float] = []
    deadline = time.monotonic() + budget_s
    for i in range(count):
        if time.monotonic() > deadline:
            break
        samples.append(step(i))
    return samples
