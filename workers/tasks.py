"""Celery tasks of the host worker: thin wrappers that call the host runtime.

Each task is declared once, with its name, queue and arguments, in shoal/queue.py; this module
registers the implementations under those names. Arguments are ids and names, never objects: a
pool arrives as its name and is read from this host's own configuration. The runtime is created
once per worker process when the worker is ready (after any fork), with its own libvirt
connection.
"""

from __future__ import annotations

import logging
import sys

from celery import shared_task
from celery.signals import worker_init, worker_ready, worker_shutting_down

from shoal import queue
from shoal.pools import get_pool
from shoal.settings import load
from workers.accel import required_kvm_refusal
from workers.host import HostRuntime, spec_for

log = logging.getLogger("shoal.host")
# The worker's exit status when SHOAL_REQUIRE_KVM=1 and KVM is not usable (EX_CONFIG).
EXIT_NO_KVM = 78

_runtime: HostRuntime | None = None


def runtime() -> HostRuntime:
    global _runtime
    if _runtime is None:
        _runtime = HostRuntime(load())
    return _runtime


@worker_init.connect
def _refuse_without_kvm(**_: object) -> None:
    """SHOAL_REQUIRE_KVM=1: stop before taking any task where guests would run under TCG."""
    refusal = required_kvm_refusal(load())
    if refusal:
        log.critical("%s", refusal)
        print(f"shoal worker: {refusal}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_NO_KVM)


@worker_ready.connect
def _start_runtime(**_: object) -> None:
    rt = runtime()
    rt.start(spec_for(get_pool(rt.settings, "default")))


@worker_shutting_down.connect
def _stop_runtime(**_: object) -> None:
    if _runtime is not None:
        _runtime.stop()


@shared_task(name=queue.CREATE_SESSION.name)
def create_session(*, session_id: str, pool_name: str, reply_key: str) -> None:
    runtime().create_session(session_id, pool_name, reply_key)


@shared_task(name=queue.EXECUTE.name)
def execute(*, execution_id: str, pool_name: str, record_json: str) -> None:
    runtime().execute(execution_id, pool_name, record_json)


@shared_task(name=queue.CANCEL.name)
def cancel(*, execution_id: str) -> None:
    runtime().cancel(execution_id)


@shared_task(name=queue.DESTROY_SESSION.name)
def destroy_session(*, session_id: str) -> None:
    runtime().destroy_session(session_id)


@shared_task(name=queue.SLEEP_SESSION.name)
def sleep_session(*, session_id: str, pool_name: str) -> None:
    runtime().sleep_session(session_id, pool_name)


@shared_task(name=queue.WAKE_SESSION.name)
def wake_session(*, session_id: str, pool_name: str) -> None:
    runtime().wake_session(session_id, pool_name)


@shared_task(name=queue.FORK_SESSION.name)
def fork_session(
    *, session_id: str, pool_name: str, fork_ids: list[str], reply_key: str, reuse: bool
) -> None:
    runtime().fork_session(session_id, pool_name, fork_ids, reply_key, reuse)


@shared_task(name=queue.FILE_OP.name)
def file_op(*, session_id: str, op: str, args: dict, reply_key: str, pool_name: str) -> None:
    runtime().file_op(session_id, op, args, reply_key, pool_name)


@shared_task(name=queue.PUT_FILE.name)
def put_file(
    *, session_id: str, transfer_id: str, path: str, reply_key: str, pool_name: str
) -> None:
    runtime().put_file(session_id, transfer_id, path, reply_key, pool_name)


@shared_task(name=queue.GET_FILE.name)
def get_file(
    *, session_id: str, transfer_id: str, path: str, reply_key: str, pool_name: str
) -> None:
    runtime().get_file(session_id, transfer_id, path, reply_key, pool_name)


@shared_task(name=queue.REPLENISH.name)
def replenish() -> None:
    runtime().replenish()
