"""A minimal HTTP/1.1 client on one kept-alive connection, for the latency loops.

The figures the benchmark reports are Shoal's, so the client should add as little as it can:
`requests` spends about 0.9 ms of client CPU per call on this machine (measured against
http.client on the same route), which is most of what separates two runs of Shoal's own
changes. One client per thread; not thread-safe.
"""

from __future__ import annotations

import http.client
import json
import time
from typing import Any
from urllib.parse import urlparse

# gunicorn closes a kept-alive connection idle for 2 s (its default --keep-alive): reconnect
# before that rather than find out by a failed request.
IDLE_RECONNECT_S = 1.0


class LeanClient:
    def __init__(self, url: str, key: str, timeout_s: float) -> None:
        parsed = urlparse(url)
        self.host = parsed.hostname or "127.0.0.1"
        self.port = parsed.port or 80
        self.timeout_s = timeout_s
        self.headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        self.conn: http.client.HTTPConnection | None = None
        self.last_used = 0.0

    def post_json(self, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
        """POST `body` as JSON; (status, response body)."""
        conn = self._connection()
        try:
            conn.request("POST", path, body=json.dumps(body), headers=self.headers)
            response = conn.getresponse()
            data = response.read()
        except (http.client.HTTPException, OSError):
            self.close()
            raise
        self.last_used = time.monotonic()
        if response.getheader("Connection", "").lower() == "close":
            self.close()
        return response.status, data

    def _connection(self) -> http.client.HTTPConnection:
        if self.conn is not None and time.monotonic() - self.last_used > IDLE_RECONNECT_S:
            self.close()
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
        return self.conn

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
