"""Signed webhook callbacks: the tenant's secret, the SSRF check, and delivery with retries.

A callback is signed per Standard Webhooks (https://www.standardwebhooks.com): the headers
`webhook-id` (the same on every retry), `webhook-timestamp` (the attempt's time, in seconds) and
`webhook-signature` = `v1,<base64 HMAC-SHA256 of "id.timestamp.body">`, keyed with the tenant's
secret `whsec_<base64>`. The secret is stored sealed with the server key (shoal/secrets_box.py).

Deliveries go through their own Celery queue (`shoal.webhooks`), taken by a worker that does
nothing else, so a slow receiver never holds up an execution. One attempt is one task; a retry is
the same task sent again with a countdown. Every attempt is recorded under the owner's delivery
key (shoal/keys.py `webhook_delivery`), which the execution and batch views show as `webhook`.

SSRF: the URL's host must resolve only to public addresses (not loopback, private, link-local,
metadata, multicast or reserved), unless the host is listed in SHOAL_WEBHOOK_ALLOW_HOSTS. It is
checked at submission and again before every attempt, and the connection goes to the address
that was checked (so a DNS answer that changes in between, "rebinding", cannot redirect it).
Redirects are never followed: a 3xx answer is a failed delivery.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import ipaddress
import json
import logging
import random
import secrets
import socket
import ssl
import time
from typing import Any
from urllib.parse import urlsplit

import redis

from shoal import executions, keys, queue, secrets_box
from shoal.errors import ValidationFailed
from shoal.records import ExecutionRecord
from shoal.settings import Settings
from shoal.timeutil import iso

log = logging.getLogger("shoal.webhooks")

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32  # Standard Webhooks asks for 24 to 64
MAX_URL = 2048
# Only the status line matters; a receiver's body is read up to this and dropped.
MAX_RESPONSE_READ = 4096
USER_AGENT = "Shoal-Webhooks/1"
# Cloud metadata services; all but the last are also caught as link-local or shared addresses,
# listed here so the refusal says what it is.
METADATA_ADDRESSES = frozenset(
    {"169.254.169.254", "169.254.170.2", "100.100.100.200", "fd00:ec2::254"}
)

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"


class Refused(ValidationFailed):
    """The callback URL may not be called (SSRF check or a malformed URL)."""


# --- the tenant's secret -------------------------------------------------------------------
def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def rotate_secret(settings: Settings, r: redis.Redis, tenant: str) -> str:
    """Give `tenant` a new signing secret and return it; the old one stops at once."""
    secret = new_secret()
    r.set(keys.webhook_secret(tenant), secrets_box.seal(settings, secret))
    return secret


def tenant_secret(settings: Settings, r: redis.Redis, tenant: str) -> str:
    """The tenant's secret, made on first use (print it with `shoal keys webhook-secret`)."""
    sealed = r.get(keys.webhook_secret(tenant))
    if sealed:
        return secrets_box.open_sealed(settings, sealed)
    secret = new_secret()
    if r.set(keys.webhook_secret(tenant), secrets_box.seal(settings, secret), nx=True):
        return secret
    return secrets_box.open_sealed(settings, r.get(keys.webhook_secret(tenant)) or "")


def sign(secret: str, msg_id: str, timestamp: int, body: str) -> str:
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    digest = hmac.new(key, f"{msg_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


# --- SSRF ------------------------------------------------------------------------------------
def allowed_hosts(settings: Settings) -> set[str]:
    return {h.strip().lower() for h in settings.webhook_allow_hosts.split(",") if h.strip()}


def address_problem(address: str) -> str | None:
    """Why a callback may not go to `address`, or None."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if str(ip) in METADATA_ADDRESSES:
        return "a cloud metadata address"
    for kind in ("loopback", "link_local", "unspecified", "multicast", "reserved", "private"):
        if getattr(ip, f"is_{kind}"):
            return f"a {kind.replace('_', '-')} address"
    if not ip.is_global:
        return "not a public address"
    return None


def resolve(settings: Settings, url: str) -> tuple[str, str, int, str]:
    """Check `url` and pick the address to connect to: (scheme, host, port, address).
    Raises Refused when the URL is malformed or its host resolves to a forbidden address."""
    if len(url) > MAX_URL or any(c.isspace() for c in url):
        raise Refused(f"callback_url must be one URL of at most {MAX_URL} characters")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Refused("callback_url must be an http:// or https:// URL with a host")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise Refused("callback_url has an invalid port") from None
    host = parts.hostname.lower()
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise Refused(f"callback_url host {host!r} does not resolve: {exc}") from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    if not addresses:
        raise Refused(f"callback_url host {host!r} does not resolve")
    if host not in allowed_hosts(settings):
        for address in addresses:
            problem = address_problem(address)
            if problem:
                raise Refused(
                    f"callback_url host {host!r} resolves to {address}, {problem}; "
                    "callbacks go only to public addresses (an operator can allow a host "
                    "with SHOAL_WEBHOOK_ALLOW_HOSTS)"
                )
    return parts.scheme, host, port, addresses[0]


def check_url(settings: Settings, url: str) -> None:
    """At submission: raise Refused (a 400) unless `url` may be called."""
    resolve(settings, url)


# --- records ---------------------------------------------------------------------------------
def _load(r: redis.Redis, owner_id: str) -> dict[str, Any] | None:
    raw = r.get(keys.webhook_delivery(owner_id))
    return json.loads(raw) if raw else None


def _save(r: redis.Redis, delivery: dict[str, Any], ttl_s: int) -> None:
    r.set(keys.webhook_delivery(delivery["owner"]), json.dumps(delivery), ex=ttl_s)


def delivery_view(r: redis.Redis, owner_id: str) -> dict[str, Any]:
    """The `webhook` field of an execution or batch: message id, status and every attempt."""
    delivery = _load(r, owner_id)
    if delivery is None:
        return {"id": None, "status": PENDING, "attempts": [], "next_attempt_at": None}
    return {k: delivery[k] for k in ("id", "status", "attempts", "next_attempt_at")}


def execution_payload(record: dict[str, Any]) -> dict[str, Any]:
    """What a callback for an execution carries: the execution as GET returns it, without the
    `webhook` delivery log (which the delivery itself changes)."""
    view = executions.public_view(record)
    view["callback_url"] = record.get("callback_url")
    return view


def execution_view(r: redis.Redis, record: ExecutionRecord) -> dict[str, Any]:
    """The /v1 execution object, with `callback_url` and `webhook` when it has a callback."""
    if not record.get("callback_url"):
        return executions.public_view(record)
    view = execution_payload(record)
    view["webhook"] = delivery_view(r, record["id"])
    return view


# --- delivery --------------------------------------------------------------------------------
def schedule(
    r: redis.Redis,
    celery,
    owner_id: str,
    tenant: str,
    url: str,
    payload: dict[str, Any],
    ttl_s: int,
) -> None:
    """Record the delivery (its message id and body are fixed here) and queue its first try."""
    delivery = {
        "owner": owner_id,
        "id": "msg_" + secrets.token_hex(12),
        "tenant": tenant,
        "url": url,
        "body": json.dumps(payload, separators=(",", ":")),
        "status": PENDING,
        "attempts": [],
        "created_at": time.time(),
        "next_attempt_at": iso(time.time()),
    }
    if not r.set(keys.webhook_delivery(owner_id), json.dumps(delivery), ex=ttl_s, nx=True):
        return  # already scheduled: an owner has one callback
    queue.DELIVER_WEBHOOK.send(celery, owner_id=owner_id)


def schedule_for_execution(r: redis.Redis, celery, record: ExecutionRecord, ttl_s: int) -> None:
    """The host's hook when an execution ends; never raises (a callback must not fail a run)."""
    if not record.get("callback_url"):
        return
    try:
        schedule(
            r,
            celery,
            record["id"],
            record["tenant"],
            record["callback_url"],
            execution_payload(record),
            ttl_s,
        )
    except Exception:
        log.exception("execution=%s scheduling its webhook failed", record["id"])


def retry_delay(settings: Settings, attempts_made: int) -> float:
    """Exponential backoff with jitter: first * 2^(n-1), capped, times a random 0.5-1.0."""
    base = min(
        settings.webhook_retry_first_s * 2 ** (attempts_made - 1), settings.webhook_retry_max_s
    )
    return base * (0.5 + random.random() / 2)


class _PinnedHTTP(http.client.HTTPConnection):
    """Connects to the address that passed the SSRF check, whatever DNS says now."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def post_once(
    settings: Settings, url: str, headers: dict[str, str], body: bytes
) -> tuple[int | None, str | None, bool]:
    """One attempt: (HTTP status or None, error or None, worth retrying)."""
    try:
        scheme, host, port, address = resolve(settings, url)
    except Refused as exc:
        transient = "does not resolve" in exc.message
        return None, exc.message, transient
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    cls = _PinnedHTTPS if scheme == "https" else _PinnedHTTP
    conn = cls(host, port, address, settings.webhook_timeout_s)
    try:
        conn.request("POST", target, body=body, headers=headers)
        response = conn.getresponse()
        response.read(MAX_RESPONSE_READ)
        status = response.status
    except (OSError, http.client.HTTPException) as exc:
        return None, f"{type(exc).__name__}: {exc}", True
    finally:
        conn.close()
    if 200 <= status < 300:
        return status, None, False
    retry = status == 429 or status >= 500
    note = "a redirect (not followed)" if 300 <= status < 400 else f"HTTP {status}"
    return status, note, retry


def deliver(settings: Settings, r: redis.Redis, celery, owner_id: str) -> None:
    """Make one attempt at the owner's callback and record it; queue the next one if due."""
    delivery = _load(r, owner_id)
    if delivery is None or delivery["status"] != PENDING:
        return
    secret = tenant_secret(settings, r, delivery["tenant"])
    now = time.time()
    timestamp = int(now)
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "webhook-id": delivery["id"],
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, delivery["id"], timestamp, delivery["body"]),
    }
    started = time.monotonic()
    status, error, retry = post_once(settings, delivery["url"], headers, delivery["body"].encode())
    delivery["attempts"].append(
        {
            "at": iso(now),
            "status_code": status,
            "error": error,
            "duration_ms": round((time.monotonic() - started) * 1000, 1),
        }
    )
    delay = retry_delay(settings, len(delivery["attempts"])) if retry else 0.0
    window_end = delivery["created_at"] + settings.webhook_retry_window_s
    if error is None:
        delivery["status"], delivery["next_attempt_at"] = DELIVERED, None
    elif retry and time.time() + delay <= window_end:
        delivery["next_attempt_at"] = iso(time.time() + delay)
    else:
        delivery["status"], delivery["next_attempt_at"] = FAILED, None
    _save(r, delivery, settings.execution_ttl_s)
    log.info(
        "webhook owner=%s id=%s attempt=%d status=%s error=%s -> %s",
        owner_id,
        delivery["id"],
        len(delivery["attempts"]),
        status,
        error,
        delivery["status"],
    )
    if delivery["status"] == PENDING:
        queue.DELIVER_WEBHOOK.send(celery, owner_id=owner_id, countdown=delay)
