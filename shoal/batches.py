"""Batch records in Redis: what each item runs, how far it got, and the batch's views.

A batch is a hash (tenant, pool, status, ...), a hash of item specs (what to run) and a hash of
item states, both keyed by the item's index. The API creates them (validating every item: an
invalid one is kept with status `invalid` and an `error`); the batch runner
(workers/batch_runner.py) advances the items.

Item statuses: pending -> running -> an execution's final status (succeeded, failed, timed_out,
cancelled, lost), or `error` when the item could not run (its session could not be made, an
upload failed), or `invalid` from the start. Batch statuses: running -> completed | cancelled.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
import time
from functools import lru_cache
from typing import Any

import redis

from shoal import executions, keys, redis_conn, sessions, storage, webhooks
from shoal.errors import BatchNotFound, PayloadTooLarge, ShoalError, ValidationFailed
from shoal.protocol import MAX_CODE_BYTES
from shoal.records import BatchItem, BatchMeta
from shoal.settings import Settings
from shoal.timeutil import iso

# Limits, and why.
MAX_ITEMS = 1000  # one batch's records stay small enough to read in one Redis round trip
MAX_PARALLEL = 64  # threads of one coordinator; a host restores ~1 VM/s anyway
DEFAULT_PARALLEL = 8
MAX_PAGE = 1000
DEFAULT_PAGE = 100
MAX_COLLECT_PATTERNS = 20
MAX_COLLECT_FILES = 100  # per item
MAX_COLLECT_BYTES = 10 << 20  # per item: collected files live in Redis with the item
DEFAULT_MAX_OUTPUT = 4096

PENDING, RUNNING, INVALID, ERROR = "pending", "running", "invalid", "error"
BATCH_RUNNING, COMPLETED, CANCELLED = "running", "completed", "cancelled"

ITEM_KEYS = {"code", "language", "timeout_s", "max_output", "files", "collect", "session_id"}


def new_id() -> str:
    return "bat_" + secrets.token_hex(10)


# --- validation ------------------------------------------------------------------------------
def _file_name_problem(name: object) -> str | None:
    if not isinstance(name, str) or not name or len(name) > 1024:
        return "file names are non-empty strings of at most 1024 characters"
    if name.startswith("/") or any(part in ("", ".", "..") for part in name.split("/")):
        return f"file name {name!r} must be a relative path without '.', '..' or empty parts"
    return None


def validate_item(
    settings: Settings, r: redis.Redis, tenant: str, raw: object
) -> tuple[dict[str, Any] | None, str | None]:
    """(the item's spec, None) or (None, what is wrong with it)."""
    if not isinstance(raw, dict):
        return None, "an item must be a JSON object"
    unknown = sorted(set(raw) - ITEM_KEYS)
    if unknown:
        return None, f"unknown fields {unknown}"
    code = raw.get("code")
    if not isinstance(code, str):
        return None, "code: a string is required"
    try:
        if len(code.encode()) > MAX_CODE_BYTES:
            return None, f"code: over the {MAX_CODE_BYTES}-byte limit"
    except UnicodeEncodeError:
        return None, "code: not valid Unicode text (it holds a lone surrogate)"
    language = raw.get("language", "python")
    if language not in ("python", "shell"):
        return None, "language: must be one of python, shell"
    timeout_s = raw.get("timeout_s")
    if timeout_s is None:
        timeout_s = settings.default_timeout_s
    if not isinstance(timeout_s, int) or isinstance(timeout_s, bool):
        return None, "timeout_s: an integer is required"
    if not 1 <= timeout_s <= settings.max_timeout_s:
        return None, f"timeout_s: must be between 1 and {settings.max_timeout_s} seconds"
    max_output = raw.get("max_output", DEFAULT_MAX_OUTPUT)
    if not isinstance(max_output, int) or not 0 <= max_output <= settings.max_output_cap:
        return None, f"max_output: an integer between 0 and {settings.max_output_cap}"
    files = raw.get("files") or {}
    if not isinstance(files, dict):
        return None, "files: an object of {name: base64 content} is required"
    for name, content in files.items():
        problem = _file_name_problem(name)
        if problem:
            return None, f"files: {problem}"
        try:
            size = len(base64.b64decode(content, validate=True)) if isinstance(content, str) else -1
        except (binascii.Error, ValueError):
            size = -1
        if size < 0:
            return None, f"files: {name!r} is not valid base64"
        if size > settings.max_upload_bytes:
            return None, f"files: {name!r} is over the {settings.max_upload_bytes}-byte limit"
    collect = raw.get("collect") or []
    if (
        not isinstance(collect, list)
        or len(collect) > MAX_COLLECT_PATTERNS
        or not all(isinstance(p, str) and 0 < len(p) <= 256 for p in collect)
    ):
        return None, f"collect: a list of at most {MAX_COLLECT_PATTERNS} glob patterns"
    session_id = raw.get("session_id")
    if session_id is not None:
        if not isinstance(session_id, str):
            return None, "session_id: a string is required"
        try:
            entry = sessions.get_for_tenant(r, tenant, session_id)
        except ShoalError as exc:
            return None, f"session_id: {exc.message}"
        if entry["state"] == sessions.LOST:
            return None, f"session_id: session {session_id} was lost"
    spec = {
        "code": code,
        "language": language,
        "timeout_s": timeout_s,
        "max_output": max_output,
        "files": files,
        "collect": collect,
        "session_id": session_id,
    }
    return spec, None


# --- records ---------------------------------------------------------------------------------
def create(
    settings: Settings,
    r: redis.Redis,
    tenant: str,
    pool: str,
    raw_items: list,
    max_parallel: int,
    callback_url: str | None,
    batch_id: str | None = None,
    from_session: str = "",
) -> dict[str, str]:
    """Store a new batch (every item validated) and return its hash; the caller queues it.
    `from_session`: each item without a session of its own runs in a fork of that session."""
    if not raw_items:
        raise ValidationFailed("items: a batch needs at least one item")
    if len(raw_items) > MAX_ITEMS:
        raise PayloadTooLarge(f"items: at most {MAX_ITEMS} items per batch, not {len(raw_items)}")
    batch_id = batch_id or new_id()
    ttl = settings.execution_ttl_s
    specs, items = {}, {}
    for index, raw in enumerate(raw_items):
        spec, error = validate_item(settings, r, tenant, raw)
        item = {"index": index, "status": PENDING if spec else INVALID, "error": error}
        items[str(index)] = json.dumps(item)
        if spec:
            specs[str(index)] = json.dumps(spec)
    meta: BatchMeta = {
        "id": batch_id,
        "tenant": tenant,
        "pool": pool,
        "status": BATCH_RUNNING,
        "max_parallel": str(max_parallel),
        "callback_url": callback_url or "",
        "created_at": f"{time.time():.6f}",
        "started_at": "",
        "finished_at": "",
        "total": str(len(raw_items)),
    }
    if from_session:
        meta["from_session"] = from_session
    # Counted against what the tenant holds in Redis before anything is stored: refused
    # (TenantStorageFull, StorageFull) when it does not fit.
    size = sum(_hash_bytes(h) for h in (meta, items, specs))
    storage.reserve(r, tenant, "batch:" + batch_id, size, ttl, storage.caps(settings))
    pipe = r.pipeline()
    pipe.hset(keys.batch(batch_id), mapping=meta)
    pipe.hset(keys.batch_items(batch_id), mapping=items)
    if specs:
        pipe.hset(keys.batch_specs(batch_id), mapping=specs)
    for key in (keys.batch(batch_id), keys.batch_items(batch_id), keys.batch_specs(batch_id)):
        pipe.expire(key, ttl)
    pipe.sadd(keys.batches_running(), batch_id)
    pipe.execute()
    return meta


# A hash field's cost in Redis beyond its name and value (counted with each, shoal/storage.py).
FIELD_OVERHEAD = 48


def _hash_bytes(fields: dict[str, str]) -> int:
    return sum(len(k) + len(v) + FIELD_OVERHEAD for k, v in fields.items())


# Write fields of one of a batch's hashes and count the change against its tenant
# (shoal/storage.py: the batch is one entry); the batch's keys, and its entry, then expire
# `ttl` after this write, so a batch that runs long keeps its records. A batch already expired
# is not written (its keys would come back without a TTL).
# KEYS: the hash written, the batch's meta, items and specs. ARGV: the tenant's storage keys'
# names around the tenant's name (2 + 2), the totals' name, now, the TTL, the batch id, then
# field, value pairs. Returns 1 when written. The storage keys are named in the script, as the
# tenant is read here: fine on the one Redis (not a cluster) that Shoal runs on.
_WRITE = redis_conn.script(
    storage.LUA
    + """
local tenant = redis.call('HGET', KEYS[2], 'tenant')
if not tenant then return 0 end
local zkey, hkey = ARGV[1] .. tenant .. ARGV[2], ARGV[3] .. tenant .. ARGV[4]
local now, ttl, member = tonumber(ARGV[6]), tonumber(ARGV[7]), 'batch:' .. ARGV[8]
local size = tonumber(redis.call('HGET', hkey, member))
if not size then
  size = ENTRY_OVERHEAD
  for k = 2, 4 do
    for _, field in ipairs(redis.call('HKEYS', KEYS[k])) do
      size = size + #field + FIELD_OVERHEAD + redis.call('HSTRLEN', KEYS[k], field)
    end
  end
end
for i = 9, #ARGV, 2 do
  if redis.call('HEXISTS', KEYS[1], ARGV[i]) == 0 then
    size = size + #ARGV[i] + FIELD_OVERHEAD
  else
    size = size - redis.call('HSTRLEN', KEYS[1], ARGV[i])
  end
  size = size + #ARGV[i + 1]
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
for k = 2, 4 do redis.call('EXPIRE', KEYS[k], ttl) end
charge(tenant, zkey, hkey, ARGV[5], member, size, now + ttl, now)
return 1
""".replace("ENTRY_OVERHEAD", str(storage.ENTRY_OVERHEAD)).replace(
        "FIELD_OVERHEAD", str(FIELD_OVERHEAD)
    )
)
_STORAGE_KEYS = (
    *keys.tenant_storage("\0").split("\0"),
    *keys.tenant_storage_sizes("\0").split("\0"),
    keys.storage_totals(),
)


def _write(r: redis.Redis, batch_id: str, key: str, ttl_s: int, **fields: str) -> bool:
    """Write `fields` into `key`, one of the batch's hashes; see _WRITE."""
    script_keys = [
        key,
        keys.batch(batch_id),
        keys.batch_items(batch_id),
        keys.batch_specs(batch_id),
    ]
    args: list[str | int] = [*_STORAGE_KEYS, f"{time.time():.6f}", int(ttl_s), batch_id]
    for name, value in fields.items():
        args += [name, value]
    return bool(_WRITE(keys=script_keys, args=args, client=r))


def load(r: redis.Redis, batch_id: str) -> BatchMeta | None:
    return r.hgetall(keys.batch(batch_id)) or None


def get_for_tenant(r: redis.Redis, tenant: str, batch_id: str) -> BatchMeta:
    meta = load(r, batch_id) if batch_id.startswith("bat_") else None
    if meta is None or meta["tenant"] != tenant:
        raise BatchNotFound(f"no batch {batch_id!r}")
    return meta


def load_items(r: redis.Redis, batch_id: str) -> dict[int, BatchItem]:
    return {int(i): json.loads(v) for i, v in r.hgetall(keys.batch_items(batch_id)).items()}


def load_item(r: redis.Redis, batch_id: str, index: int) -> BatchItem:
    return json.loads(r.hget(keys.batch_items(batch_id), str(index)) or "{}")


def load_spec(r: redis.Redis, batch_id: str, index: int) -> dict[str, Any]:
    return json.loads(r.hget(keys.batch_specs(batch_id), str(index)) or "{}")


def save_item(r: redis.Redis, batch_id: str, item: BatchItem, ttl_s: int) -> None:
    """Store the item's state (with its execution and collected files, when it has them); its
    bytes count against the batch's tenant, and are stored whatever its cap (a result is never
    lost: the tenant's next submission is refused instead)."""
    _write(r, batch_id, keys.batch_items(batch_id), ttl_s, **{str(item["index"]): json.dumps(item)})


def mark_started(r: redis.Redis, batch_id: str, ttl_s: int) -> None:
    _write(r, batch_id, keys.batch(batch_id), ttl_s, started_at=f"{time.time():.6f}")


def cancel_requested(r: redis.Redis, batch_id: str) -> bool:
    return bool(r.exists(keys.batch_cancel(batch_id)))


def request_cancel(r: redis.Redis, meta: dict[str, str], ttl_s: int) -> None:
    """Mark the batch cancelled; the runner ends its pending items, the caller cancels the
    executions in flight."""
    if meta["status"] != BATCH_RUNNING:
        return
    r.set(keys.batch_cancel(meta["id"]), "1", ex=ttl_s)
    _write(r, meta["id"], keys.batch(meta["id"]), ttl_s, status=CANCELLED)
    meta["status"] = CANCELLED


def finish(r: redis.Redis, batch_id: str, ttl_s: int) -> BatchMeta:
    """Every item has ended: the batch is completed (unless it was cancelled)."""
    meta = load(r, batch_id) or {}
    done = {"finished_at": f"{time.time():.6f}"}
    if meta.get("status") == BATCH_RUNNING:
        done["status"] = COMPLETED
    _write(r, batch_id, keys.batch(batch_id), ttl_s, **done)
    pipe = r.pipeline()
    pipe.srem(keys.batches_running(), batch_id)
    if meta.get("tenant"):
        pipe.zrem(keys.tenant_batches(meta["tenant"]), batch_id)
    pipe.execute()
    return load(r, batch_id) or meta


# --- views -----------------------------------------------------------------------------------
def item_view(r: redis.Redis, item: BatchItem) -> dict[str, Any]:
    execution = item.get("execution")
    if execution is None and item.get("execution_id"):
        record = executions.load(r, item["execution_id"])
        execution = executions.public_view(record) if record else None
    return {
        "index": item["index"],
        "status": item["status"],
        "execution": execution,
        "files": item.get("files") or {},
        "files_truncated": bool(item.get("files_truncated")),
        "error": item.get("error"),
    }


def counts(items: dict[int, BatchItem]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items.values():
        out[item["status"]] = out.get(item["status"], 0) + 1
    return dict(sorted(out.items()))


def payload(
    r: redis.Redis,
    meta: dict[str, str],
    limit: int = DEFAULT_PAGE,
    cursor: str | None = None,
    status: str | None = None,
) -> dict[str, Any]:
    """The batch object as GET /v1/batches/{id} returns it (without the `webhook` log)."""
    try:
        start = int(cursor) if cursor else 0
    except ValueError:
        raise ValidationFailed("cursor: not a cursor this API returned") from None
    items = load_items(r, meta["id"])
    order = [
        i for i in sorted(items) if i >= start and (not status or items[i]["status"] == status)
    ]
    page = order[:limit]
    next_cursor = str(order[limit]) if len(order) > limit else None

    def stamp(value: str) -> str | None:
        return iso(float(value)) if value else None

    return {
        "id": meta["id"],
        "pool": meta["pool"],
        "status": meta["status"],
        "max_parallel": int(meta["max_parallel"]),
        "from_session": meta.get("from_session") or None,
        "callback_url": meta.get("callback_url") or None,
        "created_at": stamp(meta["created_at"]),
        "finished_at": stamp(meta.get("finished_at", "")),
        "total": int(meta["total"]),
        "counts": counts(items),
        "items": [item_view(r, items[i]) for i in page],
        "next_cursor": next_cursor,
    }


def view(r: redis.Redis, meta: BatchMeta, **page: Any) -> dict[str, Any]:
    out = payload(r, meta, **page)
    if out["callback_url"]:
        out["webhook"] = webhooks.delivery_view(r, meta["id"])
    return out


# --- collect ---------------------------------------------------------------------------------
@lru_cache(maxsize=256)
def glob_regex(pattern: str) -> re.Pattern[str]:
    """A shell-style glob on paths relative to /mnt/data: `*` and `?` stay within one path part,
    `**` crosses parts (`**/` also matches no directory), `[...]` is a character class."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = pattern.find("]", i + 2)
            if end < 0:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1 : end].replace("\\", "\\\\")
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append(f"(?!/)[{body}]")
                i = end + 1
                continue
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


def matches(path: str, patterns: list[str]) -> bool:
    return any(glob_regex(p.lstrip("/")).match(path) for p in patterns)
