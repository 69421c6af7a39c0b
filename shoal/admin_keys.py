"""Admin keys: the operator's keys. They reach /healthz's details and /metrics, never a tenant's
data.

An admin key is stored as every key is (shoal/tenants.py): only the SHA-256 of the key, in the
same hash, listed by id, revoked by id. Its entry has `role: admin` and no `tenant` field. Every
tenant route finds its tenant through that field (tenants.authenticate_request,
tenants.authenticate), so an admin key names no tenant and reaches no tenant's sessions, files,
executions or batches by construction; api/auth.py answers it 403 there, saying why.
"""

from __future__ import annotations

import secrets
import time

import redis

from shoal import keys
from shoal.tenants import KEY_PREFIX, hash_key

ADMIN = "admin"
TENANT = "tenant"
# Recognisable in a config file or a leaked log line; still well formed for tenants' lookups.
ADMIN_KEY_PREFIX = KEY_PREFIX + "admin_"


def create_admin_key(r: redis.Redis, note: str = "") -> tuple[str, str]:
    """Make a new admin key; return (key_id, key). The key is shown once: only its hash is
    kept."""
    key_id = "key_" + secrets.token_hex(6)
    api_key = ADMIN_KEY_PREFIX + secrets.token_urlsafe(32)
    digest = hash_key(api_key)
    entry = {"key_id": key_id, "role": ADMIN, "created_at": f"{time.time():.3f}"}
    if note:
        entry["note"] = note[:200]
    pipe = r.pipeline()
    pipe.hset(keys.api_key(digest), mapping=entry)
    pipe.hset(keys.api_key_ids(), key_id, digest)
    pipe.execute()
    return key_id, api_key


def role_of(r: redis.Redis, api_key: str) -> str | None:
    """ADMIN, TENANT, or None for a key that is not valid (never issued, revoked, malformed)."""
    if not api_key.startswith(KEY_PREFIX) or len(api_key) > 200:
        return None
    entry = r.hmget(keys.api_key(hash_key(api_key)), "role", "tenant")
    if entry[0] == ADMIN and not entry[1]:
        return ADMIN
    return TENANT if entry[1] else None


def is_admin(r: redis.Redis, api_key: str) -> bool:
    return role_of(r, api_key) == ADMIN
