"""What a pool's image holds, as its hosts published it (the dynamic-sessions `metadata`)."""

from __future__ import annotations

import json

from shoal import keys
from shoal.context import Context
from shoal.pools import get_pool


def pool_metadata(c: Context, pool_name: str) -> dict:
    """Runtimes and preinstalled packages of a pool's image."""
    pool = get_pool(c.settings, pool_name)
    raw = c.redis.get(keys.image_info(pool.image))
    info = json.loads(raw) if raw else {}
    packages = info.get("python_packages", {})
    return {
        "pool": pool.name,
        "image": pool.image,
        "runtimes": [{"name": "python", "version": info.get("python_version", "")}],
        "packages": [{"name": n, "version": v} for n, v in sorted(packages.items())],
    }
