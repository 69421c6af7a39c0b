"""Tenants and their API keys. Keys are stored only as SHA-256 hashes."""

from __future__ import annotations

import hashlib
import re
import secrets
import time

import redis

from shoal import keys
from shoal.errors import ValidationFailed

KEY_PREFIX = "shoal_"
TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def create_key(r: redis.Redis, tenant: str) -> tuple[str, str]:
    """Make a new key for `tenant` (created on first use); return (key_id, key). The key is
    shown once: only its hash is kept."""
    if not TENANT_NAME.match(tenant):
        raise ValidationFailed(
            "tenant names are 1-63 characters: letters, digits, '_', '.', '-'; "
            "starting with a letter or digit"
        )
    key_id = "key_" + secrets.token_hex(6)
    api_key = KEY_PREFIX + secrets.token_urlsafe(32)
    digest = hash_key(api_key)
    pipe = r.pipeline()
    pipe.hset(
        keys.api_key(digest),
        mapping={"key_id": key_id, "tenant": tenant, "created_at": f"{time.time():.3f}"},
    )
    pipe.hset(keys.api_key_ids(), key_id, digest)
    pipe.sadd(keys.tenants(), tenant)
    pipe.execute()
    return key_id, api_key


def _well_formed(api_key: str) -> bool:
    """A key of ours can be looked up; anything else is refused without a Redis call."""
    return api_key.startswith(KEY_PREFIX) and len(api_key) <= 200


def authenticate(r: redis.Redis, api_key: str) -> str | None:
    """The tenant owning `api_key`, or None."""
    if not _well_formed(api_key):
        return None
    return r.hget(keys.api_key(hash_key(api_key)), "tenant")


def authenticate_reading(
    r: redis.Redis, api_key: str, key: str
) -> tuple[str | None, dict[str, str]]:
    """authenticate() and the hash at `key` in one round trip (the request's session, read
    before its owner is known: the caller checks the owner before using it)."""
    if not _well_formed(api_key):
        return None, {}
    pipe = r.pipeline(transaction=False)
    pipe.hget(keys.api_key(hash_key(api_key)), "tenant")
    pipe.hgetall(key)
    tenant, entry = pipe.execute()
    return tenant, entry


def list_keys(r: redis.Redis) -> list[dict[str, str]]:
    rows = []
    for _key_id, digest in sorted(r.hgetall(keys.api_key_ids()).items()):
        entry = r.hgetall(keys.api_key(digest))
        if entry:
            rows.append(entry)
    return rows


def revoke(r: redis.Redis, key_id: str) -> bool:
    digest = r.hget(keys.api_key_ids(), key_id)
    if digest is None:
        return False
    pipe = r.pipeline()
    pipe.delete(keys.api_key(digest))
    pipe.hdel(keys.api_key_ids(), key_id)
    pipe.execute()
    return True


def max_sessions(r: redis.Redis, tenant: str, default: int) -> int:
    """The tenant's session cap: its own (`shoal keys max-sessions`) or the instance default."""
    own = r.get(keys.tenant_max_sessions(tenant))
    return int(own) if own else default


def set_max_sessions(r: redis.Redis, tenant: str, limit: int | None) -> None:
    """Give `tenant` its own session cap; None goes back to SHOAL_TENANT_MAX_SESSIONS."""
    if limit is None:
        r.delete(keys.tenant_max_sessions(tenant))
    else:
        r.set(keys.tenant_max_sessions(tenant), str(int(limit)))
