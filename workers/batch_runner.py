"""Runs a batch: one coordinator per batch, on the batch worker (queue `shoal.batches`).

The coordinator is a plain Celery task that drives the batch's items through the same
use cases the API calls (shoal/use_cases/): create a session, upload the item's files, submit
the execution, wait for it, collect output files, delete the session. So an item is exactly
what a client would do by hand, and every rule the API enforces (pool caps, tenant caps, the
host's one-execution-at-a-time slot, the liveness check) applies to batch items too. A batch
`from_session` makes each item's session a fork of that session instead (POST
/v1/sessions/{id}/fork): its host captures the session once and starts every item's fork from
that capture while the session runs nothing else.

Concurrency: up to `max_parallel` items at a time (a thread each), and never more sessions than
the tenant's cap allows: an item waits while the tenant is at its cap (or the pool at its own)
and starts when a session frees up, so a batch larger than the cap still finishes. An item that
has waited SHOAL_BATCH_SESSION_WAIT_S without any of the tenant's sessions ending (a cap held
by sessions that stay) ends `error` instead of waiting forever.

Fair share: a coordinator runs its batch only when the batch gets a turn among its tenant's
running batches (shoal/batch_turns.py); a batch over its tenant's cap waits in Redis and lets
the coordinator go, so one tenant's batches never hold every coordinator.

Failure: an item's failure, timeout or lost VM ends only that item. The coordinator holds a
lease in Redis (renewed every few seconds); when its worker dies the lease runs out, and the
batch worker's resume loop (workers/async_tasks.py) starts a new coordinator, which ends the
items that were in flight as `lost` (an execution is never run twice) and runs the rest.
"""

from __future__ import annotations

import base64
import logging
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from shoal import batch_turns, batches, executions, keys, queue, sessions, tenants, webhooks
from shoal.context import Context
from shoal.errors import (
    NoHostAvailable,
    PoolExhausted,
    ShoalError,
    TenantSessionLimit,
    TooManyPendingExecutions,
)
from shoal.protocol import FILE_CHUNK
from shoal.records import BatchItem, ExecutionRecord, SessionEntry
from shoal.use_cases import executions as execution_cases
from shoal.use_cases import files as file_cases
from shoal.use_cases import sessions as session_cases

log = logging.getLogger("shoal.batches")

LEASE_S = 30
LEASE_RENEW_S = 5
CAP_POLL_S = 0.25  # how often an item waiting for a session (or execution) slot looks again


def resume_orphans(c: Context) -> list[str]:
    """Start a coordinator again for each batch whose coordinator started and then died, and
    wake the waiting batches of tenants with room to run them (a lost wake-up costs at most
    one lease period)."""
    resumed, tenants_waiting = [], set()
    for batch_id in c.redis.smembers(keys.batches_running()):
        meta = batches.load(c.redis, batch_id)
        if meta is None:
            c.redis.srem(keys.batches_running(), batch_id)
            continue
        if batch_turns.is_waiting(c.redis, meta):
            tenants_waiting.add(meta["tenant"])
        elif meta.get("started_at") and not c.redis.exists(keys.batch_lease(batch_id)):
            log.warning("batch=%s its coordinator stopped; resuming it", batch_id)
            queue.RUN_BATCH.send(c.celery, batch_id=batch_id)
            resumed.append(batch_id)
    for tenant in sorted(tenants_waiting):
        resumed += batch_turns.wake(c, tenant)
    return resumed


class BatchRunner:
    def __init__(self, c: Context, batch_id: str) -> None:
        self.c = c
        self.r = c.redis
        self.batch_id = batch_id
        self.ttl_s = c.settings.execution_ttl_s
        self.token = secrets.token_hex(8)
        self._cap_lock = threading.Lock()
        self._creating = 0
        self._done = threading.Event()

    # --- the batch ---------------------------------------------------------------------------
    def run(self) -> None:
        meta = batches.load(self.r, self.batch_id)
        if meta is None or meta.get("finished_at"):
            return
        lease = keys.batch_lease(self.batch_id)
        if not self.r.set(lease, self.token, nx=True, ex=LEASE_S):
            return  # another coordinator runs it
        self.meta = meta
        if not batch_turns.take_turn(self.c, meta, LEASE_S):
            log.info("batch=%s waits: its tenant has as many batches running as it may", meta["id"])
            self._drop_lease()
            return
        try:
            batches.mark_started(self.r, self.batch_id, self.ttl_s)
            renewer = threading.Thread(target=self._renew_lease, name="batch-lease", daemon=True)
            renewer.start()
            self._recover_in_flight()
            pending = [
                i
                for i, item in sorted(batches.load_items(self.r, self.batch_id).items())
                if item["status"] == batches.PENDING
            ]
            log.info("batch=%s running %d item(s)", self.batch_id, len(pending))
            with ThreadPoolExecutor(int(meta["max_parallel"]), "batch-item") as pool:
                list(pool.map(self._run_item_safely, pending))
            meta = batches.finish(self.r, self.batch_id, self.ttl_s)
            log.info("batch=%s %s", self.batch_id, meta.get("status"))
            if meta.get("callback_url"):
                webhooks.schedule(
                    self.r,
                    self.c.celery,
                    self.batch_id,
                    meta["tenant"],
                    meta["callback_url"],
                    batches.payload(self.r, meta),
                    self.c.settings.execution_ttl_s,
                )
        finally:
            self._done.set()
            self._drop_lease()
            batch_turns.end_turn(self.c, self.meta)

    def _drop_lease(self) -> None:
        lease = keys.batch_lease(self.batch_id)
        if self.r.get(lease) == self.token:
            self.r.delete(lease)

    def _renew_lease(self) -> None:
        lease = keys.batch_lease(self.batch_id)
        while not self._done.wait(LEASE_RENEW_S):
            self.r.set(lease, self.token, ex=LEASE_S)
            batch_turns.renew_turn(self.r, self.meta, LEASE_S)

    def _recover_in_flight(self) -> None:
        """Items a dead coordinator left `running`: keep a finished execution's result, else end
        them `lost`. Their sessions are deleted; nothing is run twice."""
        for item in batches.load_items(self.r, self.batch_id).values():
            if item["status"] != batches.RUNNING:
                continue
            record = executions.load(self.r, item.get("execution_id") or "")
            if record and record["status"] in executions.FINAL:
                item["status"] = record["status"]
                item["execution"] = executions.public_view(record)
            else:
                if record:
                    execution_cases.cancel_execution(self.c, record)
                item["status"] = executions.LOST
                item["error"] = "the batch worker stopped while this item ran; it was not rerun"
            if item.get("own_session"):
                entry = sessions.load(self.r, item["own_session"])
                if entry:
                    session_cases.delete_session(self.c, entry)
            batches.save_item(self.r, self.batch_id, item, self.ttl_s)

    def _cancelled(self) -> bool:
        return batches.cancel_requested(self.r, self.batch_id)

    # --- one item ----------------------------------------------------------------------------
    def _run_item_safely(self, index: int) -> None:
        try:
            self._run_item(index)
        except Exception as exc:  # one item's trouble never stops the others
            log.exception("batch=%s item=%d failed unexpectedly", self.batch_id, index)
            item = batches.load_item(self.r, self.batch_id, index)
            item.update(index=index, status=batches.ERROR, error=f"internal error: {exc}")
            batches.save_item(self.r, self.batch_id, item, self.ttl_s)

    def _run_item(self, index: int) -> None:
        c, r = self.c, self.r
        spec = batches.load_spec(r, self.batch_id, index)
        item = batches.load_item(r, self.batch_id, index)
        if self._cancelled():
            return self._end(item, executions.CANCELLED)
        own = not spec.get("session_id")
        entry = None
        try:
            if own:
                entry = self._new_session()
                if entry is None:
                    return self._end(item, executions.CANCELLED)
                item["own_session"] = entry["id"]
            else:
                entry = sessions.get_for_tenant(r, self.meta["tenant"], spec["session_id"])
            item["status"] = batches.RUNNING
            batches.save_item(r, self.batch_id, item, self.ttl_s)
            for name, content in spec["files"].items():
                data = base64.b64decode(content)
                chunks = (data[i : i + FILE_CHUNK] for i in range(0, len(data), FILE_CHUNK))
                file_cases.upload_file(c, entry, name, chunks)
            if self._cancelled():
                return self._end(item, executions.CANCELLED)
            params = {k: spec[k] for k in ("code", "language", "timeout_s", "max_output")}
            record = self._submit(entry, params)
            if record is None:
                return self._end(item, executions.CANCELLED)
            item["execution_id"] = record["id"]
            batches.save_item(r, self.batch_id, item, self.ttl_s)
            if self._cancelled():  # a cancel that came before the execution id was saved
                execution_cases.cancel_execution(c, record)
            record = execution_cases.wait_execution(c, record)
            item["execution"] = executions.public_view(record)
            if spec["collect"] and record["status"] != executions.LOST:
                item["files"], item["error"] = self._collect(entry, spec["collect"])
                item["files_truncated"] = item["error"] is not None
            self._end(item, record["status"])
        except ShoalError as exc:
            status = executions.LOST if exc.code == "SessionLost" else batches.ERROR
            self._end(item, status, exc.message)
        finally:
            if own and entry is not None:
                session_cases.delete_session(c, entry)

    def _end(self, item: BatchItem, status: str, error: str | None = None) -> None:
        item["status"] = status
        if error:
            item["error"] = error
        batches.save_item(self.r, self.batch_id, item, self.ttl_s)

    def _new_session(self) -> SessionEntry | None:
        """A fresh session from the batch's pool (or a fork) once the tenant (and the pool)
        have room; None if the batch is cancelled while waiting.

        The wait is bounded: once SHOAL_BATCH_SESSION_WAIT_S pass with none of the tenant's
        sessions ending, it raises (the item ends `error`). Sessions ending, this batch's own
        included, restart the clock: the cap is turning over, so an item queued behind its own
        batch's items waits as long as they run, but a cap held by sessions that stay ends it."""
        tenant, pool = self.meta["tenant"], self.meta["pool"]
        default_cap = self.c.settings.tenant_max_sessions
        limit = self.c.settings.batch_session_wait_s
        since, seen = time.monotonic(), None
        while not self._cancelled():
            live = self.r.smembers(keys.tenant_sessions(tenant))
            with self._cap_lock:
                cap = tenants.max_sessions(self.r, tenant, default_cap)
                room = len(live) + self._creating < cap
                if room:
                    self._creating += 1
            blocked: ShoalError = TenantSessionLimit()
            if room:
                try:
                    return self._make_session(tenant, pool)
                except (TenantSessionLimit, PoolExhausted, NoHostAvailable) as exc:
                    blocked = exc  # another client took the room first; wait for the next
                finally:
                    with self._cap_lock:
                        self._creating -= 1
            if seen is not None and seen - live:  # one of the tenant's sessions ended
                since = time.monotonic()
            seen = live
            if time.monotonic() - since >= limit:
                raise _wait_expired(blocked, cap, pool, limit)
            time.sleep(CAP_POLL_S)
        return None

    def _make_session(self, tenant: str, pool: str) -> SessionEntry:
        """A new session of the pool, or a fork of the batch's `from_session`."""
        parent_id = self.meta.get("from_session")
        if not parent_id:
            return session_cases.create_session(self.c, tenant, pool)
        parent = sessions.get_for_tenant(self.r, tenant, parent_id)
        return session_cases.fork_session(self.c, tenant, parent, 1, reuse=True)[0]

    def _submit(self, entry: SessionEntry, params: dict) -> ExecutionRecord | None:
        """Submit once the session and the tenant have room for another unfinished execution
        (bounds shared with the tenant's other clients); None if the batch is cancelled while
        waiting."""
        while not self._cancelled():
            try:
                return execution_cases.submit_execution(self.c, entry, params)
            except TooManyPendingExecutions:
                time.sleep(CAP_POLL_S)
        return None

    def _download_within(self, entry: SessionEntry, path: str, budget: int) -> bytes | None:
        """The file's bytes, or None as soon as they pass `budget` (the rest is never read: a
        file the guest keeps growing costs the coordinator no more than the budget)."""
        _, chunks = file_cases.download_file(self.c, entry, path)
        data = bytearray()
        try:
            for chunk in chunks:
                data += chunk
                if len(data) > budget:
                    return None
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()  # a stream left early stops the host's side at once
        return bytes(data)

    def _collect(
        self, entry: SessionEntry, patterns: list[str]
    ) -> tuple[dict[str, str], str | None]:
        """Files under /mnt/data matching `patterns`, base64; matched on the host against the
        guest's listing (plain strings: the host never opens a guest path)."""
        listing = file_cases.file_op(self.c, entry, "list", path="", recursive=True)["files"]
        wanted = [
            f for f in listing if f["type"] == "file" and batches.matches(f["path"], patterns)
        ]
        files: dict[str, str] = {}
        skipped: list[str] = []
        budget = batches.MAX_COLLECT_BYTES
        for f in wanted:
            if len(files) >= batches.MAX_COLLECT_FILES or f["size"] > budget:
                skipped.append(f["path"])
                continue
            data = self._download_within(entry, f["path"], budget)
            if data is None:  # it grew past the budget after the listing: left out too
                skipped.append(f["path"])
                continue
            budget -= len(data)
            files[f["path"]] = base64.b64encode(data).decode()
        note = None
        if skipped:
            note = (
                f"collect: {len(skipped)} file(s) left out (limits: {batches.MAX_COLLECT_FILES} "
                f"files, {batches.MAX_COLLECT_BYTES} bytes per item): {skipped[:5]}"
            )
        return files, note


def _wait_expired(blocked: ShoalError, cap: int, pool: str, limit: float) -> ShoalError:
    """What ends an item that waited too long for a session, by what kept it waiting."""
    if isinstance(blocked, PoolExhausted):
        why = f"pool {pool!r} stayed at its max_sessions"
    elif isinstance(blocked, NoHostAvailable):
        why = "no host had room for a session"
    else:
        why = f"the tenant stayed at its session cap ({cap} sessions)"
    return type(blocked)(
        f"{why} for {limit:g} s with none of the tenant's sessions ending; the item did not "
        "run (SHOAL_BATCH_SESSION_WAIT_S)"
    )
