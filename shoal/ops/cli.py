"""The `shoal` command for operators; ./scripts/up, down and test are thin wrappers around it."""

from __future__ import annotations

import argparse
import logging
import sys

from shoal import admin_keys, redis_conn, tenants
from shoal.errors import ShoalError
from shoal.ops import stack
from shoal.settings import FIELDS, Settings, env_name, load


def _cmd_up(s: Settings, a: argparse.Namespace) -> int:
    return stack.up(s, detach=a.detach)


def _cmd_down(s: Settings, a: argparse.Namespace) -> int:
    return stack.down(s)


def _cmd_status(s: Settings, a: argparse.Namespace) -> int:
    return stack.status(s)


def _cmd_daemons(s: Settings, a: argparse.Namespace) -> int:
    from shoal.ops import daemons

    print(f"shoal: virtlogd {daemons.ensure_virtlogd()}", flush=True)
    libvirtd = daemons.restart_libvirtd() if a.restart_libvirtd else daemons.ensure_libvirtd()
    print(f"shoal: libvirtd {libvirtd}", flush=True)
    return 0


def _cmd_image_build(s: Settings, a: argparse.Namespace) -> int:
    from shoal.ops import image_build

    path = image_build.build(
        s, a.name, progress=lambda m: print(f"shoal: {m}", flush=True), force=a.force
    )
    print(path)
    return 0


def _cmd_keys_create(s: Settings, a: argparse.Namespace) -> int:
    if a.admin == bool(a.tenant):
        print("shoal: give either --tenant NAME or --admin", file=sys.stderr)
        return 2
    if a.admin:
        key_id, key = admin_keys.create_admin_key(redis_conn.client(s))
        print(
            f"{key}\n(key id {key_id}, admin: /healthz's details and /metrics, no tenant's data; "
            "shown once, only its hash is kept)"
        )
        return 0
    key_id, key = tenants.create_key(redis_conn.client(s), a.tenant)
    print(f"{key}\n(key id {key_id}, tenant {a.tenant}; shown once, only its hash is kept)")
    return 0


def _cmd_keys_list(s: Settings, a: argparse.Namespace) -> int:
    for row in tenants.list_keys(redis_conn.client(s)):
        owner = f"tenant={row['tenant']}" if "tenant" in row else f"role={row.get('role', '?')}"
        print(f"{row['key_id']}  {owner}")
    return 0


def _cmd_keys_revoke(s: Settings, a: argparse.Namespace) -> int:
    if tenants.revoke(redis_conn.client(s), a.key_id):
        print(f"revoked {a.key_id}")
        return 0
    print(f"no key {a.key_id}", file=sys.stderr)
    return 1


def _cmd_keys_webhook_secret(s: Settings, a: argparse.Namespace) -> int:
    from shoal import webhooks

    print(webhooks.rotate_secret(s, redis_conn.client(s), a.tenant))
    return 0


def _cmd_keys_max_sessions(s: Settings, a: argparse.Namespace) -> int:
    tenants.set_max_sessions(redis_conn.client(s), a.tenant, a.limit or None)
    print(f"tenant {a.tenant}: at most {a.limit or s.tenant_max_sessions} live sessions")
    return 0


def _cmd_keys_limits(s: Settings, a: argparse.Namespace) -> int:
    r = redis_conn.client(s)
    given = {name: getattr(a, name) for name in tenants.LIMITS if getattr(a, name) is not None}
    if given:
        tenants.set_limits(r, a.tenant, **given)
    found = tenants.limits(r, a.tenant, s)
    print(f"tenant {a.tenant}: " + ", ".join(f"{name} {value:g}" for name, value in found.items()))
    return 0


def _cmd_settings(s: Settings, a: argparse.Namespace) -> int:
    """Print the settings table (the one in README.md) with this machine's values."""
    print("| variable | default here | meaning |\n|---|---|---|")
    for f in FIELDS:
        print(f"| `{env_name(f.name)}` | `{getattr(s, f.name)}` | {f.metadata.get('doc', '')} |")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shoal", description="Operate a Shoal instance.")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start every part and wait until healthy")
    up.add_argument("--detach", action="store_true", help="return once healthy")
    up.set_defaults(func=_cmd_up)
    sub.add_parser("down", help="stop what `up` started; destroy this instance's VMs").set_defaults(
        func=_cmd_down
    )
    sub.add_parser("status", help="show components and /healthz").set_defaults(func=_cmd_status)
    host_daemons = sub.add_parser(
        "daemons", help="start the host's virtlogd and libvirtd unless they run"
    )
    host_daemons.add_argument(
        "--restart-libvirtd",
        action="store_true",
        help="stop libvirtd and start it again (running domains survive it)",
    )
    host_daemons.set_defaults(func=_cmd_daemons)
    image = sub.add_parser("image", help="guest images").add_subparsers(dest="sub", required=True)
    build = image.add_parser("build", help="build a guest image (cached by recipe hash)")
    build.add_argument("name", nargs="?", default="python")
    build.add_argument("--force", action="store_true", help="rebuild even when cached")
    build.set_defaults(func=_cmd_image_build)
    keys = sub.add_parser("keys", help="API keys").add_subparsers(dest="sub", required=True)
    create = keys.add_parser("create", help="make an API key for a tenant, or an admin key")
    who = create.add_mutually_exclusive_group(required=True)
    who.add_argument("--tenant", help="the tenant the key acts for")
    who.add_argument(
        "--admin",
        action="store_true",
        help="an admin key: /healthz's details and /metrics, never a tenant's routes",
    )
    create.set_defaults(func=_cmd_keys_create)
    keys.add_parser("list", help="list key ids and their tenants (or role)").set_defaults(
        func=_cmd_keys_list
    )
    revoke = keys.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("key_id")
    revoke.set_defaults(func=_cmd_keys_revoke)
    secret = keys.add_parser(
        "webhook-secret", help="rotate a tenant's webhook signing secret and print the new one"
    )
    secret.add_argument("--tenant", required=True)
    secret.set_defaults(func=_cmd_keys_webhook_secret)
    cap = keys.add_parser("max-sessions", help="give a tenant its own session cap (0: default)")
    cap.add_argument("--tenant", required=True)
    cap.add_argument("limit", type=int)
    cap.set_defaults(func=_cmd_keys_max_sessions)
    limits = keys.add_parser(
        "limits", help="show a tenant's limits, or give it its own (0: back to the default)"
    )
    limits.add_argument("--tenant", required=True)
    limits.add_argument("--rate", type=float, help="requests per second (SHOAL_TENANT_RATE)")
    limits.add_argument("--burst", type=int, help="requests at once (SHOAL_TENANT_BURST)")
    limits.add_argument(
        "--max-waits", type=int, help="requests waiting for executions (SHOAL_TENANT_MAX_WAITS)"
    )
    limits.add_argument(
        "--max-pending", type=int, help="unfinished executions (SHOAL_TENANT_MAX_PENDING)"
    )
    limits.add_argument(
        "--max-session-pending",
        type=int,
        help="unfinished executions per session (SHOAL_SESSION_MAX_PENDING)",
    )
    limits.add_argument(
        "--max-redis-mib",
        type=int,
        help="MiB of records, outputs and batch results in Redis (SHOAL_TENANT_MAX_REDIS_MIB)",
    )
    limits.set_defaults(func=_cmd_keys_limits)
    sub.add_parser("settings", help="print every setting").set_defaults(func=_cmd_settings)
    from shoal.bench.options import add_parser as add_bench_parser

    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(load(), args)
    except ShoalError as exc:
        print(f"shoal: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
