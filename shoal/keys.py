"""Every Redis key name Shoal uses, built in this one module with one prefix."""

from __future__ import annotations

PREFIX = "shoal"


def api_key(key_hash: str) -> str:
    """Hash: key_id, tenant, created_at, for the SHA-256 of an API key."""
    return f"{PREFIX}:apikey:{key_hash}"


def api_key_ids() -> str:
    """Hash: key_id -> SHA-256 of the key, to list and revoke keys by id."""
    return f"{PREFIX}:apikeys"


def tenants() -> str:
    return f"{PREFIX}:tenants"


def session(session_id: str) -> str:
    """Hash: the session's registry entry (tenant, pool, host, state, ...)."""
    return f"{PREFIX}:session:{session_id}"


def session_seq(session_id: str) -> str:
    """Counter: the arrival number of the session's latest execution."""
    return f"{PREFIX}:session:{session_id}:seq"


def session_deadlines() -> str:
    """Sorted set: live session ids scored by the time they expire if left idle."""
    return f"{PREFIX}:sessions:deadlines"


def sleep_deadlines() -> str:
    """Sorted set: sleeping session ids scored by the end of their pool's sleep retention."""
    return f"{PREFIX}:sessions:sleep-deadlines"


def session_lifetimes() -> str:
    """Sorted set: live session ids scored by the end of their pool's max lifetime."""
    return f"{PREFIX}:sessions:lifetimes"


def pool_sessions(pool: str) -> str:
    """Set: the ids of a pool's live sessions, across hosts (for max_sessions)."""
    return f"{PREFIX}:pool:{pool}:sessions"


def tenant_sessions(tenant: str) -> str:
    """Set: the ids of the tenant's live sessions."""
    return f"{PREFIX}:tenant:{tenant}:sessions"


def identifier(tenant: str, pool: str, ident: str) -> str:
    """String: the session id behind a dynamic-sessions identifier, per tenant and pool."""
    return f"{PREFIX}:ident:{tenant}:{pool}:{ident}"


def host_sessions(host: str) -> str:
    """Set: the ids of the sessions placed on a host."""
    return f"{PREFIX}:host:{host}:sessions"


def execution(execution_id: str) -> str:
    """String: the execution record as JSON."""
    return f"{PREFIX}:exec:{execution_id}"


def execution_done(execution_id: str) -> str:
    """List: pushed once when the execution ends, so a waiting request wakes at once."""
    return f"{PREFIX}:exec:{execution_id}:done"


def execution_cancel(execution_id: str) -> str:
    """String: set when a client asked to cancel the execution."""
    return f"{PREFIX}:exec:{execution_id}:cancel"


def session_executions(session_id: str) -> str:
    """Sorted set: execution ids of a session not yet finished, scored by arrival number."""
    return f"{PREFIX}:session:{session_id}:pending"


def idempotency(tenant: str, key: str) -> str:
    return f"{PREFIX}:idem:{tenant}:{key}"


def transfer(transfer_id: str) -> str:
    """List: file chunks in flight between the API and a host."""
    return f"{PREFIX}:xfer:{transfer_id}"


def transfer_cancel(transfer_id: str) -> str:
    """String: set when the receiving side of a transfer stopped reading, so the sender stops."""
    return f"{PREFIX}:xfer:{transfer_id}:cancel"


def host_heartbeat(host: str) -> str:
    """String (JSON, with a TTL): a worker host's last heartbeat and its libvirt state."""
    return f"{PREFIX}:heartbeat:{host}"


def hosts() -> str:
    """Set: every host that has ever registered with this Redis."""
    return f"{PREFIX}:hosts"


def beat_heartbeat() -> str:
    return f"{PREFIX}:heartbeat:beat"


def beat_lock() -> str:
    return f"{PREFIX}:lock:beat"


def host_queue(host: str) -> str:
    """The Celery queue a host's worker consumes."""
    return f"{PREFIX}.host.{host}"


def image_info(image: str) -> str:
    """String (JSON): an image's Python version and packages, published by the hosts."""
    return f"{PREFIX}:image:{image}"


def tenant_sleepers(tenant: str) -> str:
    """Sorted set: the tenant's sleeping sessions, scored by when they fell asleep."""
    return f"{PREFIX}:tenant:{tenant}:sleepers"


def usage(tenant: str) -> str:
    """Hash: pool -> session-seconds of the tenant's ended sessions."""
    return f"{PREFIX}:usage:{tenant}"


# --- fair share per tenant (docs/limits.md) ------------------------------------------------
def tenant_max_sessions(tenant: str) -> str:
    """String: the tenant's own session cap, overriding SHOAL_TENANT_MAX_SESSIONS."""
    return f"{PREFIX}:tenant:{tenant}:max_sessions"


def tenant_limits(tenant: str) -> str:
    """Hash: the tenant's own rate, burst, max_waits, max_pending, max_session_pending,
    max_redis_mib, each overriding its SHOAL_* default (shoal/tenants.py LIMITS)."""
    return f"{PREFIX}:tenant:{tenant}:limits"


def tenant_bucket(tenant: str) -> str:
    """Hash (with a TTL): the tenant's request token bucket: tokens, at_ms."""
    return f"{PREFIX}:tenant:{tenant}:bucket"


def tenant_executions(tenant: str) -> str:
    """Sorted set: the tenant's unfinished execution ids, scored by when they stop counting
    (long after any could still be running: a record that never ends cannot hold a slot)."""
    return f"{PREFIX}:tenant:{tenant}:pending"


def tenant_waits(tenant: str) -> str:
    """Sorted set: the tenant's requests waiting for an execution, scored by their deadline (an
    API process that died mid-wait leaks no slot past it)."""
    return f"{PREFIX}:tenant:{tenant}:waits"


# --- Redis memory per tenant (shoal/storage.py, docs/limits.md "Storage") --------------------
def tenant_storage(tenant: str) -> str:
    """Sorted set: what the tenant holds in Redis (an execution's record, a batch, a webhook
    delivery, ...), each entry scored by when its data expires."""
    return f"{PREFIX}:tenant:{tenant}:storage"


def tenant_storage_sizes(tenant: str) -> str:
    """Hash: entry of tenant_storage -> the bytes it is counted for."""
    return f"{PREFIX}:tenant:{tenant}:storage:sizes"


def storage_totals() -> str:
    """Hash: tenant -> the bytes its entries are counted for; `*`: all tenants together."""
    return f"{PREFIX}:storage:totals"


# --- webhooks and batches (docs/async.md) ---------------------------------------------------


def webhook_secret(tenant: str) -> str:
    """String: the tenant's webhook signing secret, encrypted with the server key."""
    return f"{PREFIX}:tenant:{tenant}:webhook_secret"


def webhook_delivery(owner_id: str) -> str:
    """String (JSON): the webhook of an execution or batch: message id, body, attempts."""
    return f"{PREFIX}:webhook:{owner_id}"


def batch(batch_id: str) -> str:
    """Hash: a batch's tenant, pool, status, max_parallel, callback_url, times."""
    return f"{PREFIX}:batch:{batch_id}"


def batch_items(batch_id: str) -> str:
    """Hash: item index -> the item's state as JSON (status, execution, files, error)."""
    return f"{PREFIX}:batch:{batch_id}:items"


def batch_specs(batch_id: str) -> str:
    """Hash: item index -> what the item runs (code, language, files, collect) as JSON."""
    return f"{PREFIX}:batch:{batch_id}:specs"


def batch_cancel(batch_id: str) -> str:
    """String: set when a client asked to cancel the batch."""
    return f"{PREFIX}:batch:{batch_id}:cancel"


def batch_lease(batch_id: str) -> str:
    """String (with a TTL): held by the coordinator running the batch."""
    return f"{PREFIX}:batch:{batch_id}:lease"


def batches_running() -> str:
    """Set: ids of batches not yet finished, for resuming after a batch worker dies."""
    return f"{PREFIX}:batches:running"


# --- fair share between tenants in the asynchronous pipelines (docs/limits.md) ---------------
def webhooks_in_flight(tenant: str) -> str:
    """Sorted set (shoal/leases.py): the tenant's webhook attempts in flight, by lease end."""
    return f"{PREFIX}:tenant:{tenant}:webhooks:inflight"


def webhooks_deferred(tenant: str) -> str:
    """Sorted set: the tenant's deliveries put off for its in-flight cap, by when last put off."""
    return f"{PREFIX}:tenant:{tenant}:webhooks:deferred"


def tenant_batches(tenant: str) -> str:
    """Sorted set (shoal/leases.py): the tenant's unfinished batches, by when their records
    expire; bounds the batches a tenant may have at once."""
    return f"{PREFIX}:tenant:{tenant}:batches"


def batch_coordinators(tenant: str) -> str:
    """Sorted set (shoal/leases.py): the tenant's batches holding a coordinator, by lease end."""
    return f"{PREFIX}:tenant:{tenant}:batches:coordinators"


def batches_waiting(tenant: str) -> str:
    """Sorted set: the tenant's batches waiting for a coordinator, by when they began to wait."""
    return f"{PREFIX}:tenant:{tenant}:batches:waiting"
