"""What the sync and async clients share: configuration, the API's routes as plain request
descriptions, the retry rule, and turning answers into objects or exceptions. No I/O here."""

from __future__ import annotations

import base64
import os
import random
import ssl
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx

from shoal_client import _files, errors
from shoal_client.models import BatchItem

DEFAULT_URL = "http://127.0.0.1:8080"
RETRY_STATUSES = frozenset({429, 503})
RETRY_AFTER_MAX_S = 60.0
FORK_WAIT_S = 300.0  # the server's own wait for 16 forks, and more
WAIT_MARGIN_S = 60.0
DATA_DIR = "/mnt/data"
BACKOFF_FIRST_S = 0.25
BACKOFF_MAX_S = 10.0


@dataclass(frozen=True)
class Config:
    url: str
    api_key: str
    timeout_s: float = 120.0
    max_retries: int = 4
    verify: bool | str = True  # a CA bundle's path for a self-signed HTTPS listener

    @classmethod
    def resolve(
        cls,
        url: str | None,
        api_key: str | None,
        timeout_s: float,
        max_retries: int,
        ca_file: str | None,
    ) -> Config:
        """Arguments first, then SHOAL_URL / SHOAL_API_KEY / SHOAL_CA_FILE."""
        key = api_key or os.environ.get("SHOAL_API_KEY", "")
        if not key:
            raise errors.ShoalError(
                "NoApiKey", "pass api_key= or set SHOAL_API_KEY (`shoal keys create`)"
            )
        base = (url or os.environ.get("SHOAL_URL") or DEFAULT_URL).rstrip("/")
        ca = ca_file or os.environ.get("SHOAL_CA_FILE")
        return cls(base, key, timeout_s, max_retries, ca or True)

    def tls(self) -> ssl.SSLContext | bool:
        """What httpx verifies the server with: the system's CAs, or the given bundle."""
        if isinstance(self.verify, str):
            return ssl.create_default_context(cafile=self.verify)
        return self.verify

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}", "User-Agent": "shoal-client/0.1"}

    def http_options(self) -> dict[str, Any]:
        """The arguments of httpx.Client / httpx.AsyncClient."""
        return {"base_url": self.url, "headers": self.headers(), "timeout": self.timeout_s,
                "verify": self.tls()}  # fmt: skip


@dataclass(frozen=True)
class Call:
    """One request. `replayable`: sending it twice does no harm (a read, a PUT, a delete, or a
    submit carrying an Idempotency-Key), so it may be retried after a failure mid-request;
    anything else is retried only when the server refused it (429/503) or it never left."""

    method: str
    path: str
    json: Any = None
    params: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    replayable: bool = True
    timeout_s: float | None = None  # this request's own, when it may wait longer


def seg(value: str) -> str:
    return quote(value, safe="")


def file_path(path: str) -> str:
    """A path under /mnt/data as the routes take it: relative (`/mnt/data/x` and `/x` mean `x`)."""
    if path.startswith(DATA_DIR + "/"):
        path = path[len(DATA_DIR) + 1 :]
    return quote(path.lstrip("/"), safe="/")


# --- routes (docs/api.md) ---------------------------------------------------------------------
def create_session(pool: str) -> Call:
    return Call("POST", "/v1/sessions", json={"pool": pool}, replayable=False)


def get_session(session_id: str) -> Call:
    return Call("GET", f"/v1/sessions/{seg(session_id)}")


def list_sessions() -> Call:
    return Call("GET", "/v1/sessions")


def delete_session(session_id: str) -> Call:
    return Call("DELETE", f"/v1/sessions/{seg(session_id)}")


def sleep_session(session_id: str) -> Call:
    """Asking twice is harmless: a sleeping session stays asleep."""
    return Call("POST", f"/v1/sessions/{seg(session_id)}/sleep")


def wake_session(session_id: str) -> Call:
    return Call("POST", f"/v1/sessions/{seg(session_id)}/wake")


def fork_session(session_id: str, count: int) -> Call:
    """Not replayed: a request that reached the server and is sent again makes more forks. The
    server may take a while (the capture, then each fork's start)."""
    path, body = f"/v1/sessions/{seg(session_id)}/fork", {"count": count}
    return Call("POST", path, json=body, replayable=False, timeout_s=FORK_WAIT_S)


def submit(
    session_id: str,
    code: str,
    language: str,
    timeout_s: float,
    wait: bool,
    max_output: int | None,
    idempotency_key: str | None,
) -> Call:
    body: dict[str, Any] = {"code": code, "language": language, "timeout_s": timeout_s,
                            "wait": wait}  # fmt: skip
    if max_output is not None:
        body["max_output"] = max_output
    key = idempotency_key or f"shoal-client-{uuid.uuid4()}"
    # With `wait` the server holds the request while the code runs (and a grace after).
    return Call("POST", f"/v1/sessions/{seg(session_id)}/executions", json=body,
                headers={"Idempotency-Key": key},
                timeout_s=timeout_s + WAIT_MARGIN_S if wait else None)  # fmt: skip


def get_execution(execution_id: str) -> Call:
    return Call("GET", f"/v1/executions/{seg(execution_id)}")


def cancel_execution(execution_id: str) -> Call:
    return Call("POST", f"/v1/executions/{seg(execution_id)}/cancel")


def list_files(session_id: str, path: str, recursive: bool) -> Call:
    params = {"path": path, "recursive": "true" if recursive else "false"}
    return Call("GET", f"/v1/sessions/{seg(session_id)}/files", params=params)


def file_call(method: str, session_id: str, path: str) -> Call:
    return Call(method, f"/v1/sessions/{seg(session_id)}/files/{file_path(path)}")


def submit_batch(
    items: list[dict[str, Any]],
    pool: str | None,
    max_parallel: int,
    callback_url: str | None,
    from_session: str | None = None,
) -> Call:
    body: dict[str, Any] = {"max_parallel": max_parallel, "items": items}
    if pool is not None:
        body["pool"] = pool
    if callback_url:
        body["callback_url"] = callback_url
    if from_session:
        body["from_session"] = from_session
    return Call("POST", "/v1/batches", json=body, replayable=False)


def get_batch(batch_id: str, cursor: int | None = None, limit: int = 1000) -> Call:
    params: dict[str, Any] = {"limit": limit}
    if cursor is not None:
        params["cursor"] = cursor
    return Call("GET", f"/v1/batches/{seg(batch_id)}", params=params)


def cancel_batch(batch_id: str) -> Call:
    return Call("POST", f"/v1/batches/{seg(batch_id)}/cancel")


def batch_item(
    code: str,
    language: str = "python",
    *,
    files: dict[str, bytes] | None = None,
    collect: list[str] | None = None,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """One item of a batch, its files base64-encoded as the API takes them."""
    item: dict[str, Any] = {"code": code, "language": language}
    if files:
        item["files"] = {path: base64.b64encode(data).decode() for path, data in files.items()}
    if collect:
        item["collect"] = list(collect)
    if timeout_s is not None:
        item["timeout_s"] = timeout_s
    return item


def pools(name: str | None = None) -> Call:
    return Call("GET", "/v1/pools" + (f"/{seg(name)}" if name else ""))


def usage() -> Call:
    return Call("GET", "/v1/usage")


# --- answers and retries ----------------------------------------------------------------------
class Attempts:
    """One request's attempts: what each one sends, and whether a failure is tried again. The
    rule both clients share; only their I/O differs."""

    def __init__(self, call: Call, source: _files.Source | None, config: Config) -> None:
        self.call, self.config, self.attempt = call, config, 0
        self.body = None if source is None else _files.Body(source)
        # A body that cannot be sent again (a file object that cannot seek back) is never
        # retried once it may have been read.
        self.resendable = self.body is None or self.body.replayable

    def request_args(self, for_async: bool) -> dict[str, Any]:
        """The arguments of httpx's build_request for the next attempt (a fresh body)."""
        call, body = self.call, self.body
        content = None if body is None else body.achunks() if for_async else body.chunks()
        return {"method": call.method, "url": call.path, "json": call.json,
                "params": call.params, "content": content,
                "headers": {**call.headers, **(body.headers() if body else {})},
                "timeout": call.timeout_s or self.config.timeout_s}  # fmt: skip

    def after_failure(self, exc: httpx.TransportError) -> float:
        """Seconds to wait before trying again after a failure on the wire; raises the
        client's error when the request may not (or need not) be sent again."""
        never_sent = self.resendable and isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)
        delay = retry_delay(self.attempt, self.config.max_retries, None, None)
        if delay is None or not ((self.call.replayable and self.resendable) or never_sent):
            raise connection_error(exc, self.config.url) from exc
        self.attempt += 1
        return delay

    def after_answer(self, status: int, retry_after: str | None) -> float | None:
        """Seconds to wait before trying again after an answer, or None to keep it."""
        if status < 400 or not self.resendable:
            return None
        delay = retry_delay(self.attempt, self.config.max_retries, status, retry_after)
        self.attempt += 1
        return delay


def check(status: int, body: Any, retry_after: str | None) -> None:
    if status >= 400:
        raise errors.from_response(status, body, retry_after)


def retry_delay(
    attempt: int, max_retries: int, status: int | None, retry_after: str | None
) -> float | None:
    """Seconds to wait before attempt `attempt + 1`, or None to give up. `status` None: the
    request failed on the wire (the caller decides whether it may be replayed)."""
    if attempt >= max_retries or (status is not None and status not in RETRY_STATUSES):
        return None
    try:
        asked = min(float(retry_after), RETRY_AFTER_MAX_S) if retry_after else 0.0
    except ValueError:
        asked = 0.0
    backoff = min(BACKOFF_FIRST_S * 2**attempt, BACKOFF_MAX_S) * (0.5 + random.random() / 2)
    return max(asked, backoff)


def connection_error(exc: Exception, url: str) -> errors.ShoalError:
    return errors.ShoalError("ConnectionFailed", f"{url}: {type(exc).__name__}: {exc}")


def newly_finished(batch: dict[str, Any], seen: set[int]) -> list[BatchItem]:
    """The batch's items that ended since the last look (their indexes join `seen`)."""
    found = []
    for raw in batch.get("items", []):
        item = BatchItem.parse(raw)
        if item.done and item.index not in seen:
            seen.add(item.index)
            found.append(item)
    return found


def batch_over(batch: dict[str, Any], seen: set[int]) -> bool:
    return batch.get("status") != "running" and len(seen) >= int(batch.get("total", 0))
