"""Native API: pools with their live counts, and the tenant's metered usage."""

from __future__ import annotations

from flask import g
from flask_smorest import Blueprint
from marshmallow import Schema, fields

from api.auth import require_tenant
from api.context import ctx
from shoal import hosts, sessions
from shoal.pools import Pool, all_pools, get_pool

blp = Blueprint("v1_pools", __name__, url_prefix="/v1", description="Pools and usage")
blp.before_request(require_tenant)


class Counts(Schema):
    ready = fields.Integer()
    busy = fields.Integer()
    total = fields.Integer()


class PoolOut(Schema):
    name = fields.String()
    image = fields.String()
    vcpus = fields.Integer()
    memory_mib = fields.Integer()
    data_disk_mib = fields.Integer()
    ready_target = fields.Integer()
    ready_max = fields.Integer()
    max_sessions = fields.Integer()
    cooldown_s = fields.Integer()
    max_lifetime_s = fields.Integer()
    network = fields.Boolean()
    counts = fields.Nested(Counts)
    hosts = fields.Dict(keys=fields.String(), values=fields.Nested(Counts))


class PoolList(Schema):
    pools = fields.List(fields.Nested(PoolOut))


class UsageOut(Schema):
    tenant = fields.String()
    pools = fields.Dict(
        keys=fields.String(),
        values=fields.Dict(),
        metadata={
            "description": "pool -> {session_seconds (awake), sleeping_seconds, live_sessions, "
            "sleeping_sessions}"
        },
    )


def pool_view(pool: Pool, beats: dict) -> dict:
    hosts = {}
    for host, beat in beats.items():
        counts = beat.get("pools", {}).get(pool.name, {})
        ready, busy = counts.get("ready", 0), counts.get("busy", 0)
        hosts[host] = {"ready": ready, "busy": busy, "total": ready + busy}
    totals = {name: sum(h[name] for h in hosts.values()) for name in ("ready", "busy", "total")}
    return {**pool.to_dict(), "counts": totals, "hosts": hosts}


@blp.get("/pools")
@blp.response(200, PoolList)
def list_pools():
    beats = hosts.live_hosts(ctx().redis)
    return {"pools": [pool_view(p, beats) for p in all_pools(ctx().settings).values()]}


@blp.get("/pools/<name>")
@blp.response(200, PoolOut)
def get_pool_view(name: str):
    return pool_view(get_pool(ctx().settings, name), hosts.live_hosts(ctx().redis))


@blp.get("/usage")
@blp.response(200, UsageOut)
def usage():
    """Session-seconds per pool (the reference service bills per session-hour), time asleep
    apart."""
    return {"tenant": g.tenant, "pools": sessions.usage(ctx().redis, g.tenant)}
