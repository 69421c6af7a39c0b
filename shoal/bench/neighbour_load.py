"""Tenant A of the `noisy_neighbour` scenario (shoal/bench/neighbours.py): its sessions flooded
with sleeping executions and its requests sent at its rate limit.

The flood: at least the host worker's threads plus FLOOD_MARGIN unfinished executions, spread
evenly over A_SESSIONS sessions (`size_flood`). Each sleeps in its guest for about the longest
an execution may take, so one per session runs (holding one worker thread) and the rest wait
their turn for the whole measurement (holding none: workers/session_queue.py).

The load: one thread posts more sleeping executions to A's sessions in turn, at OVER_RATE
times A's rate limit, so A is at its limit throughout; it gets 429s (RateLimited past the rate,
TooManyPendingExecutions while the flood is full, which is most of the time) and tops the flood
up whenever one of A's executions ends. Another thread samples A's unfinished executions from
the instance's Redis, when the benchmark can reach it.

Everything talks to 127.0.0.1, stops by itself (HAMMER_MAX_S, RETRY_DEADLINE_S) and A's
sessions are deleted at the end, which ends their running and waiting executions.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import requests

from shoal.bench.core import REQUEST_TIMEOUT_S, Bench, BenchError
from shoal.bench.lean_http import LeanClient

NEIGHBOUR_TENANT = "bench-neighbour"
A_SESSIONS = 4
FLOOD_MARGIN = 8  # issue 12: at least the worker's thread count plus 8 queued in all
OVER_RATE = 1.25  # A sends at 1.25x its rate limit: at it all the time, the excess refused
HAMMER_MAX_S = 300  # A's request thread stops by itself after this long, whatever happens
RETRY_DEADLINE_S = 60  # A's setup and cleanup requests retry RateLimited this long
SAMPLE_EVERY_S = 0.5
A_REQUEST_TIMEOUT_S = 30  # each request of A's load
SLEEP_MARGIN_S = 10  # a sleeping execution ends this long before its timeout would cut it


@dataclass(frozen=True)
class Flood:
    """How A's unfinished executions are spread: `per_session` in each of `sessions`."""

    sessions: int
    per_session: int
    need: int  # the worker's threads plus the margin: what `total` must reach

    @property
    def total(self) -> int:
        return self.sessions * self.per_session


def size_flood(
    worker_threads: int, sessions: int = A_SESSIONS, margin: int = FLOOD_MARGIN
) -> Flood:
    """The smallest even flood over `sessions` with at least worker_threads + margin
    unfinished executions in all."""
    if worker_threads < 1 or sessions < 1 or margin < 0:
        raise ValueError("worker threads and sessions must be at least 1, the margin at least 0")
    need = worker_threads + margin
    return Flood(sessions, -(-need // sessions), need)


def outcome(status: int, body: bytes) -> str:
    """What one of A's requests got: `accepted` (2xx), else the error code of Shoal's error
    shape ({"error": {"code"}}), else `HTTP <status>`."""
    if 200 <= status < 300:
        return "accepted"
    try:
        code = json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        code = None
    return code if isinstance(code, str) and code else f"HTTP {status}"


def sleep_body(max_timeout_s: int) -> dict[str, Any]:
    """An execution that sleeps in its guest for about the longest an execution may take."""
    timeout_s = max(int(max_timeout_s), 1)
    sleep_s = max(timeout_s - SLEEP_MARGIN_S, 1)
    return {"code": f"import time; time.sleep({sleep_s})", "wait": False, "timeout_s": timeout_s}


class Neighbour:
    """Tenant A: its sessions, its flood, its request thread and the sampler of its
    unfinished executions. `close()` stops both threads and deletes A's sessions."""

    def __init__(
        self,
        b: Bench,
        key: str,
        flood: Flood,
        rate: float,
        pending: Callable[[], int] | None = None,
    ) -> None:
        self.b = b
        self.key = key
        self.flood = flood
        self.rate = rate
        self.pending = pending  # A's unfinished executions, read from Redis; None: not sampled
        self.body = sleep_body(b.settings.max_timeout_s)
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {key}"
        self.session_ids: list[str] = []
        self.fill_tally: Counter[str] = Counter()
        self.load_tally: Counter[str] = Counter()
        self.load_s = 0.0
        self.samples: list[tuple[float, int]] = []  # (monotonic time, A's unfinished)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    # --- setup and cleanup -------------------------------------------------------------------
    def request(self, method: str, path: str, **kw: Any) -> requests.Response:
        """One of A's own requests, retried while it is answered RateLimited (A's bucket is
        empty after its load), for up to RETRY_DEADLINE_S."""
        deadline = time.monotonic() + RETRY_DEADLINE_S
        while True:
            response = self.http.request(method, self.b.url + path, timeout=REQUEST_TIMEOUT_S, **kw)
            if outcome(response.status_code, response.content) != "RateLimited":
                return response
            if time.monotonic() > deadline:
                raise BenchError(f"tenant A: {method} {path} still rate limited after "
                                 f"{RETRY_DEADLINE_S} s")  # fmt: skip
            time.sleep(float(response.headers.get("Retry-After", "1")))

    def open_sessions(self, pool: str) -> None:
        def one() -> None:
            response = self.request("POST", "/v1/sessions", json={"pool": pool})
            if response.status_code != 201:
                raise BenchError(f"POST /v1/sessions: {response.status_code} "
                                 f"{response.text[:300]}")  # fmt: skip
            with self._lock:
                self.session_ids.append(response.json()["id"])

        with ThreadPoolExecutor(self.flood.sessions) as pool_:
            futures = [pool_.submit(one) for _ in range(self.flood.sessions)]
        errors = [exc for f in futures if (exc := f.exception()) is not None]
        if errors:
            raise BenchError(
                f"tenant A: {len(errors)} of {self.flood.sessions} sessions not made: {errors[0]}"
            )

    def fill(self) -> None:
        """Post per_session sleeping executions to each of A's sessions (wait false)."""
        for session_id in self.session_ids:
            for _ in range(self.flood.per_session):
                response = self.request(
                    "POST", f"/v1/sessions/{session_id}/executions", json=self.body
                )
                got = outcome(response.status_code, response.content)
                self.fill_tally[got] += 1
                if got == "TooManyPendingExecutions":
                    break  # A's own caps are below the flood: the report says how far it got
                if got != "accepted":
                    raise BenchError(f"tenant A: execution refused: {response.status_code} "
                                     f"{response.text[:300]}")  # fmt: skip

    # --- the load ------------------------------------------------------------------------------
    def start_load(self) -> None:
        self._threads = [threading.Thread(target=self._hammer, daemon=True, name="tenant-a")]
        if self.pending is not None:
            self._threads.append(threading.Thread(target=self._sample, daemon=True))
        for thread in self._threads:
            thread.start()

    def _hammer(self) -> None:
        client = LeanClient(self.b.url, self.key, A_REQUEST_TIMEOUT_S)
        interval = 1.0 / (self.rate * OVER_RATE)
        began = time.monotonic()
        next_at, deadline, i = began, began + HAMMER_MAX_S, 0
        try:
            while not self._stop.is_set() and time.monotonic() < deadline:
                delay = next_at - time.monotonic()
                if delay > 0 and self._stop.wait(delay):
                    break
                if delay < -1.0:  # fell behind (a slow answer): no catch-up burst
                    next_at = time.monotonic()
                next_at += interval
                session_id = self.session_ids[i % len(self.session_ids)]
                i += 1
                try:
                    status, body = client.post_json(
                        f"/v1/sessions/{session_id}/executions", self.body
                    )
                    got = outcome(status, body)
                except (OSError, http.client.HTTPException) as exc:
                    got = type(exc).__name__
                with self._lock:
                    self.load_tally[got] += 1
        finally:
            self.load_s = time.monotonic() - began
            client.close()

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY_S):
            with contextlib.suppress(Exception):
                self.samples.append((time.monotonic(), int(self.pending())))

    def unfinished(self, start: float, end: float) -> list[int]:
        """A's unfinished executions as sampled between two monotonic times."""
        return [n for t, n in self.samples if start <= t <= end]

    def stop_load(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(A_REQUEST_TIMEOUT_S + 5)

    def close(self) -> None:
        """Stop the load and delete A's sessions (their executions end with them)."""
        self.stop_load()
        for session_id in self.session_ids:
            with contextlib.suppress(requests.RequestException, BenchError):
                self.request("DELETE", f"/v1/sessions/{session_id}")
        self.http.close()
