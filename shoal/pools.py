"""Pool definitions: read from pools.toml (SHOAL_POOLS_FILE), with a `default` pool always there."""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path

from shoal.errors import PoolNotFound
from shoal.settings import Settings

ON_IDLE = ("destroy", "sleep")


@dataclass(frozen=True)
class Pool:
    name: str
    image: str = "python"
    vcpus: int = 1
    memory_mib: int = 512
    data_disk_mib: int = 1024
    ready_target: int = 0
    ready_max: int = 0
    max_sessions: int = 100
    cooldown_s: int = 300
    max_lifetime_s: int = 86400
    network: bool = False
    on_idle: str = "destroy"  # or "sleep": at its cooldown a session's VM is saved, not ended
    sleep_retention_s: int = 7 * 86400  # how long a sleeping session is kept

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def ready_ceiling(self) -> int:
        """The most ready VMs a host keeps for this pool (`ready_max`, never below the target)."""
        return max(self.ready_target, self.ready_max)


def _default_pool(settings: Settings) -> Pool:
    return Pool(
        name="default",
        image=settings.default_image,
        vcpus=settings.vcpus,
        memory_mib=settings.memory_mib,
        data_disk_mib=settings.data_disk_mib,
        cooldown_s=settings.cooldown_s,
    )


def _parse(path: Path, settings: Settings) -> dict[str, Pool]:
    pools = {"default": _default_pool(settings)}
    if not path.exists():
        return pools
    with path.open("rb") as f:
        data = tomllib.load(f)
    known = {f.name for f in fields(Pool)} - {"name"}
    for name, table in data.get("pools", {}).items():
        unknown = set(table) - known
        if unknown:
            raise SystemExit(f"{path}: pool {name!r} has unknown keys {sorted(unknown)}")
        if table.get("network"):
            raise SystemExit(f"{path}: pool {name!r}: network egress is not supported yet")
        if table.get("ready_max", 0) and table["ready_max"] < table.get("ready_target", 0):
            raise SystemExit(f"{path}: pool {name!r}: ready_max is below ready_target")
        if table.get("on_idle", "destroy") not in ON_IDLE:
            raise SystemExit(f"{path}: pool {name!r}: on_idle must be one of {', '.join(ON_IDLE)}")
        retention = table.get("sleep_retention_s", 1)
        if not isinstance(retention, int) or isinstance(retention, bool) or retention <= 0:
            raise SystemExit(f"{path}: pool {name!r}: sleep_retention_s must be a positive integer")
        base = asdict(pools.get(name, Pool(name=name)))
        base.update(table)
        pools[name] = Pool(**base)
    return pools


@lru_cache(maxsize=4)
def _load_cached(path: str, mtime: float, settings: Settings) -> dict[str, Pool]:
    return _parse(Path(path), settings)


def all_pools(settings: Settings) -> dict[str, Pool]:
    path = settings.pools_path
    mtime = path.stat().st_mtime if path.exists() else 0.0
    return _load_cached(str(path), mtime, settings)


def get_pool(settings: Settings, name: str) -> Pool:
    try:
        return all_pools(settings)[name]
    except KeyError:
        raise PoolNotFound(f"no pool named {name!r}") from None
