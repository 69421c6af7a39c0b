"""Signed webhook callbacks: the tenant's secret, the SSRF check, and delivery with retries.

A callback is signed per Standard Webhooks (https://www.standardwebhooks.com): the headers
`webhook-id` (the same on every retry), `webhook-timestamp` (the attempt's time, in seconds) and
`webhook-signature` = `v1,<base64 HMAC-SHA256 of "id.timestamp.body">`, keyed with the tenant's
secret `whsec_<base64>`. The secret is stored sealed with the server key (shoal/secrets_box.py).

Deliveries go through their own Celery queue (`shoal.webhooks`), taken by a worker that does
nothing else, so a slow receiver never holds up an execution. One attempt is one task; a retry is
the same task sent again with a countdown. Every attempt is recorded under the owner's delivery
key (shoal/keys.py `webhook_delivery`), which the execution and batch views show as `webhook`.

Fair share: an attempt is bounded as a whole by SHOAL_WEBHOOK_TIMEOUT_S, DNS check included
(shoal/webhook_http.py bounds the HTTP exchange), and a tenant has at most
SHOAL_WEBHOOK_TENANT_IN_FLIGHT attempts at once; a delivery over that is put off with a
countdown rather than take a thread, so one tenant's slow receivers never stall the others'.

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
import threading
import time
from typing import Any
from urllib.parse import urlsplit

import redis

from shoal import executions, keys, leases, queue, secrets_box, storage, webhook_http
from shoal.errors import ValidationFailed
from shoal.records import ExecutionRecord
from shoal.settings import Settings
from shoal.timeutil import iso
from shoal.webhook_http import Deadline

log = logging.getLogger("shoal.webhooks")

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32  # Standard Webhooks asks for 24 to 64
MAX_URL = 2048
USER_AGENT = "Shoal-Webhooks/1"
# Cloud metadata services; all but the last are also caught as link-local or shared addresses,
# listed here so the refusal says what it is.
METADATA_ADDRESSES = frozenset(
    {"169.254.169.254", "169.254.170.2", "100.100.100.200", "fd00:ec2::254"}
)

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"

# A tenant at its in-flight cap has its delivery put off, not run: first by about DEFER_S, more
# the more of its deliveries wait (each waiting one looks again about once per that delay, so
# a tenant with a thousand waiting does not keep the workers busy looking), at most DEFER_MAX_S.
DEFER_S = 1.0
DEFER_MAX_S = 30.0
# An in-flight lease outlives the attempt's deadline by this; a worker that died mid-attempt
# frees its tenant's place when it runs out.
IN_FLIGHT_MARGIN_S = 30.0


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


def _lookup(host: str, port: int, timeout_s: float) -> list[tuple]:
    """getaddrinfo within `timeout_s`: the resolver's own timeouts are long, and a tenant may
    run the name server. A lookup still going at the deadline is left to end in its thread."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except Exception as exc:  # gaierror, UnicodeError (a bad IDN), ...
            box["error"] = exc

    thread = threading.Thread(target=run, name="webhook-dns", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise Refused(f"callback_url host {host!r} does not resolve within {timeout_s:g} s")
    if "error" in box:
        raise Refused(f"callback_url host {host!r} does not resolve: {box['error']}")
    return box["infos"]


def resolve(
    settings: Settings, url: str, deadline: Deadline | None = None
) -> tuple[str, str, int, str]:
    """Check `url` and pick the address to connect to: (scheme, host, port, address).
    Raises Refused when the URL is malformed, its host does not resolve before the deadline
    (default: SHOAL_WEBHOOK_TIMEOUT_S from now) or resolves to a forbidden address."""
    if len(url) > MAX_URL or any(c.isspace() or not c.isprintable() for c in url):
        raise Refused(f"callback_url must be one URL of at most {MAX_URL} characters")
    try:
        parts = urlsplit(url)
        hostname = parts.hostname
    except ValueError:  # e.g. "http://[::1": a bracket that is not closed
        raise Refused("callback_url is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not hostname:
        raise Refused("callback_url must be an http:// or https:// URL with a host")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise Refused("callback_url has an invalid port") from None
    host = hostname.lower()
    deadline = deadline or Deadline(settings.webhook_timeout_s)
    try:
        infos = _lookup(host, port, deadline.left())
    except TimeoutError:
        raise Refused(f"callback_url host {host!r} does not resolve in time") from None
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


def _save(r: redis.Redis, delivery: dict[str, Any], ttl_s: int, nx: bool = False) -> bool:
    """Store the delivery (only if absent, with `nx`), counted against its tenant's bytes in
    Redis (shoal/storage.py; never refused: it reports a result already stored)."""
    owner = delivery["owner"]
    body = json.dumps(delivery)
    key = keys.webhook_delivery(owner)
    return storage.store(r, delivery["tenant"], key, "webhook:" + owner, body, ttl_s, nx)


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
    if not _save(r, delivery, ttl_s, nx=True):
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


def post_once(
    settings: Settings, url: str, headers: dict[str, str], body: bytes
) -> tuple[int | None, str | None, bool]:
    """One attempt, as a whole within SHOAL_WEBHOOK_TIMEOUT_S (the DNS check included):
    (HTTP status or None, error or None, worth retrying)."""
    deadline = Deadline(settings.webhook_timeout_s)
    try:
        scheme, host, port, address = resolve(settings, url, deadline)
    except Refused as exc:
        transient = "does not resolve" in exc.message
        return None, exc.message, transient
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        status = webhook_http.post(scheme, host, port, address, target, headers, body, deadline)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        return None, f"{type(exc).__name__}: {exc}", True
    if 200 <= status < 300:
        return status, None, False
    retry = status == 429 or status >= 500
    note = "a redirect (not followed)" if 300 <= status < 400 else f"HTTP {status}"
    return status, note, retry


def in_flight_cap(settings: Settings) -> int:
    """A tenant's attempts at once: SHOAL_WEBHOOK_TENANT_IN_FLIGHT, kept below the delivery
    threads so that one tenant never holds them all (unless there is only one)."""
    return max(1, min(settings.webhook_tenant_in_flight, settings.webhook_concurrency - 1))


def defer_delay(r: redis.Redis, tenant: str, cap: int) -> float:
    """How long a delivery over its tenant's in-flight cap is put off (with jitter)."""
    waiting = r.zcard(keys.webhooks_deferred(tenant))
    return min(DEFER_MAX_S, DEFER_S * (1 + waiting / cap)) * (0.5 + random.random() / 2)


def deliver(settings: Settings, r: redis.Redis, celery, owner_id: str) -> None:
    """Make one attempt at the owner's callback and record it; queue the next one if due.

    A tenant has at most in_flight_cap() attempts at once: beyond it the delivery is sent
    again with a countdown instead of taking a delivery thread, so other tenants' deliveries
    go through while one tenant's receivers are slow."""
    delivery = _load(r, owner_id)
    if delivery is None or delivery["status"] != PENDING:
        return
    tenant, token = delivery["tenant"], secrets.token_hex(8)
    cap, deferred = in_flight_cap(settings), keys.webhooks_deferred(tenant)
    lease_s = settings.webhook_timeout_s + IN_FLIGHT_MARGIN_S
    if not leases.take(r, keys.webhooks_in_flight(tenant), token, cap, lease_s):
        delay = defer_delay(r, tenant, cap)
        pipe = r.pipeline()
        pipe.zremrangebyscore(deferred, "-inf", time.time() - 2 * DEFER_MAX_S)
        pipe.zadd(deferred, {owner_id: time.time()})
        pipe.expire(deferred, int(2 * DEFER_MAX_S))
        pipe.execute()
        log.info("webhook owner=%s at its tenant's in-flight cap; again in %.1f s", owner_id, delay)
        queue.DELIVER_WEBHOOK.send(celery, owner_id=owner_id, countdown=delay)
        return
    r.zrem(deferred, owner_id)
    try:
        _attempt(settings, r, celery, delivery)
    finally:
        leases.release(r, keys.webhooks_in_flight(tenant), token)


def _attempt(settings: Settings, r: redis.Redis, celery, delivery: dict[str, Any]) -> None:
    owner_id = delivery["owner"]
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
