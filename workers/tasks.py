"""Celery tasks: thin wrappers that call the host runtime or the housekeeping functions.

Signatures take ids and plain dicts, never objects. The runtime is created once per worker
process when the worker is ready (after any fork), with its own libvirt connection.
"""

from __future__ import annotations

import logging

from celery import shared_task
from celery.signals import worker_ready, worker_shutting_down

from pool.pools import Pool, get_pool
from shoal import replies
from shoal.errors import ShoalError
from shoal.settings import load
from workers.host import HostRuntime, spec_for

log = logging.getLogger("shoal.tasks")
_runtime: HostRuntime | None = None


def runtime() -> HostRuntime:
    global _runtime
    if _runtime is None:
        _runtime = HostRuntime(load())
    return _runtime


@worker_ready.connect
def _start_runtime(**_: object) -> None:
    rt = runtime()
    rt.start(spec_for(get_pool(rt.settings, "default")))


@worker_shutting_down.connect
def _stop_runtime(**_: object) -> None:
    if _runtime is not None:
        _runtime.stop()


@shared_task(name="shoal.create_session")
def create_session(session_id: str, pool: dict, reply_key: str) -> None:
    rt = runtime()
    try:
        rt.create_session(session_id, Pool(**pool))
        replies.send(rt.r, reply_key, {"ok": True})
    except ShoalError as exc:
        replies.send_error(rt.r, reply_key, exc)
    except Exception as exc:
        log.exception("session=%s creating the VM failed", session_id)
        rt.mark_session_lost(session_id, f"creating its VM failed: {exc}")
        replies.send_error(rt.r, reply_key, ShoalError(f"creating the session's VM failed: {exc}"))


@shared_task(name="shoal.execute")
def execute(execution_id: str, pool: dict, record_json: str = "") -> None:
    runtime().execute(execution_id, Pool(**pool), record_json)


@shared_task(name="shoal.cancel")
def cancel(execution_id: str) -> None:
    runtime().cancel(execution_id)


@shared_task(name="shoal.destroy_session")
def destroy_session(session_id: str) -> None:
    runtime().destroy_session(session_id)


@shared_task(name="shoal.file_op")
def file_op(session_id: str, op: str, args: dict, reply_key: str, pool: dict) -> None:
    runtime().file_op(session_id, op, args, reply_key, Pool(**pool))


@shared_task(name="shoal.put_file")
def put_file(session_id: str, transfer_id: str, path: str, reply_key: str, pool: dict) -> None:
    runtime().put_file(session_id, transfer_id, path, reply_key, Pool(**pool))


@shared_task(name="shoal.get_file")
def get_file(session_id: str, transfer_id: str, path: str, reply_key: str, pool: dict) -> None:
    runtime().get_file(session_id, transfer_id, path, reply_key, Pool(**pool))


@shared_task(name="shoal.replenish")
def replenish() -> None:
    runtime().replenish()
