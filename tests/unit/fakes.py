"""Stand-ins for the parts a unit test of Shoal's logic does not start: Redis is fakeredis, the
Celery app records what is sent (and can play the host's answer), the VM manager hands out
scripted VMs, and a heartbeat is published the way a host worker publishes it.

They exist for fast tests of the logic only; the integration suite runs the same paths on a real
Redis, real Celery workers and real QEMU guests.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import fakeredis
import redis
from flask import Flask

from api.app import create_app
from shoal import keys, sessions
from shoal.context import Context
from shoal.pools import get_pool
from shoal.records import SessionEntry
from shoal.settings import Settings

HOST = "h1"


@dataclass
class SentTask:
    name: str
    kwargs: dict[str, Any]
    queue: str
    expires: float | None
    countdown: float | None


class RecordingCelery:
    """Records every task sent instead of publishing it."""

    def __init__(self) -> None:
        self.sent: list[SentTask] = []

    def send_task(self, name: str, *, kwargs: dict, queue: str, expires, countdown, **_: Any):
        self.sent.append(SentTask(name, dict(kwargs), queue, expires, countdown))

    def take(self, name: str) -> list[SentTask]:
        """The tasks of that name sent so far, forgotten once taken."""
        found = [t for t in self.sent if t.name == name]
        self.sent = [t for t in self.sent if t.name != name]
        return found


class AnsweringCelery(RecordingCelery):
    """Records every task and, for a task name given an answer, plays the host: the answer runs
    in its own thread as soon as the task is sent, as a host worker would pick it up.

    `join()` waits for the answers and re-raises the first error one of them hit, so a failed
    assertion on the host's side fails the test."""

    def __init__(self) -> None:
        super().__init__()
        self.answers: dict[str, Callable[[SentTask], None]] = {}
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []

    def answer(self, name: str, handler: Callable[[SentTask], None]) -> None:
        self.answers[name] = handler

    def send_task(self, name: str, **options: Any):
        super().send_task(name, **options)
        handler = self.answers.get(name)
        if handler is None:
            return
        task = self.sent[-1]

        def run() -> None:
            try:
                handler(task)
            except BaseException as exc:  # surfaced by join()
                self.errors.append(exc)

        thread = threading.Thread(target=run, name=f"host-{name}", daemon=True)
        self.threads.append(thread)
        thread.start()

    def join(self, timeout_s: float = 5.0) -> None:
        for thread in self.threads:
            thread.join(timeout_s)
            assert not thread.is_alive(), f"the host's answer {thread.name} never finished"
        if self.errors:
            raise self.errors[0]


@dataclass
class FakeAgent:
    interrupted: int = 0

    def interrupt(self) -> None:
        self.interrupted += 1


@dataclass
class FakeVM:
    """A VM whose answers are scripted: each `execute` pops the next answer, or raises it."""

    vm_id: str
    answers: list[Any] = field(default_factory=list)
    agent: FakeAgent = field(default_factory=FakeAgent)
    ran: list[str] = field(default_factory=list)
    forked_from: tuple[str, int] | None = None  # (parent VM, which capture of it)

    def execute(self, code: str, language: str, timeout_s: float, max_output: int) -> dict:
        self.ran.append(code)
        answer = self.answers.pop(0) if self.answers else ok_answer()
        if callable(answer):  # a stand-in for a long execution: it returns the answer itself
            answer = answer()
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def put_file(self, path: str, chunks: Any) -> dict:
        return self.agent.put_file(path, chunks)


class FakeForkBases:
    """ForkBases (workers/fork_base.py) as the host runtime uses it: kept and released bases."""

    def __init__(self) -> None:
        self.kept: dict[str, Any] = {}
        self.released: list[Any] = []

    def release(self, base: Any) -> None:
        self.released.append(base)

    def drop(self, parent_id: str) -> None:
        self.kept.pop(parent_id, None)


class FakeVMManager:
    """Hands out FakeVMs; counts how often each was destroyed."""

    def __init__(self) -> None:
        self.vms: dict[str, FakeVM] = {}
        self.destroyed: dict[str, int] = {}
        self.create_error: BaseException | None = None
        self.paused_full: set[str] = set()  # VMs paused on a full host disk
        self.asleep: dict[str, FakeVM] = {}
        self.wake_error: BaseException | None = None
        self.fork_bases = FakeForkBases()
        self.captures = 0
        self.capture_error: BaseException | None = None
        self.fork_errors: dict[str, BaseException] = {}  # VM id -> what its start raises

    def create(self, vm_id: str, spec: Any) -> FakeVM:
        if self.create_error is not None:
            raise self.create_error
        vm = self.vms[vm_id] = FakeVM(vm_id)
        return vm

    def get(self, vm_id: str) -> FakeVM | None:
        return self.vms.get(vm_id)

    def attach(self, vm_id: str, spec: Any) -> FakeVM | None:
        return None

    def destroy(self, vm_id: str) -> None:
        self.destroyed[vm_id] = self.destroyed.get(vm_id, 0) + 1
        self.vms.pop(vm_id, None)
        self.asleep.pop(vm_id, None)

    def list_vms(self) -> list[FakeVM]:
        return list(self.vms.values())

    def sleep(self, vm_id: str) -> Any:
        """The VM leaves this manager, kept aside as workers/vm_sleep.py keeps its image."""
        self.asleep[vm_id] = self.vms.pop(vm_id)
        return SimpleNamespace(bytes=300 << 20, seconds=0.5)

    def is_asleep(self, vm_id: str) -> bool:
        return vm_id in self.asleep

    def sleeping_bytes(self) -> int:
        return len(self.asleep) * (300 << 20)

    def wake(self, vm_id: str, spec: Any) -> FakeVM:
        if self.wake_error is not None:
            raise self.wake_error
        vm = self.vms[vm_id] = self.asleep[vm_id]  # its image stays until drop_sleep_image
        vm.timings = {"wake": 900.0}
        return vm

    def drop_sleep_image(self, vm_id: str) -> None:
        self.asleep.pop(vm_id, None)

    def paused_on_full_disk(self, vm_id: str) -> bool:
        return vm_id in self.paused_full

    def base_for_forks(self, vm_id: str, count: int, reuse: bool = False) -> Any:
        """A stand-in base: the parent's id and which capture it is (as workers/vm.py)."""
        if reuse and self.fork_bases.kept.get(vm_id) is not None:
            return self.fork_bases.kept[vm_id]
        if self.capture_error is not None:
            raise self.capture_error
        self.captures += 1
        base = self.fork_bases.kept[vm_id] = SimpleNamespace(parent=vm_id, capture=self.captures)
        return base

    def check_fork_disks(self, base: Any, count: int) -> None:
        return None

    def start_fork(self, base: Any, vm_id: str, spec: Any, parent_id: str) -> FakeVM:
        if vm_id in self.fork_errors:
            raise self.fork_errors[vm_id]
        vm = self.vms[vm_id] = FakeVM(vm_id)
        vm.forked_from = (parent_id, base.capture)
        return vm

    def sweep(self, owned_vm_ids: Any) -> list[str]:
        return []

    def reconcile(self, known_vm_ids: set[str]) -> Any:
        """As workers/reconcile.py: known VMs with no domain here are reported missing (and the
        directories of VMs not known would be removed)."""
        self.reconciled_with = set(known_vm_ids)
        missing = sorted(v for v in known_vm_ids if v not in self.vms)
        return SimpleNamespace(missing=missing, destroyed=[])

    def status(self) -> dict:
        return {"libvirt": {"ok": True}}

    def ensure_template(self, spec: Any) -> None:
        return None


def ok_answer(result: str = "2", duration_ms: float = 1.0) -> dict:
    return {
        "status": "ok",
        "stdout": "",
        "stderr": "",
        "result": {"text/plain": result},
        "outputs": [],
        "duration_ms": duration_ms,
        "phases_ms": {"kernel": 0.5},
    }


def publish_heartbeat(
    r: redis.Redis,
    host: str = HOST,
    *,
    ready: dict[str, int] | None = None,
    vms: int = 0,
    max_vms: int = 48,
    libvirt_ok: bool = True,
    ttl_s: float = 15.0,
    memory: dict | None = None,
) -> None:
    """Register `host` and publish a heartbeat for it as workers/host.py beat_once does, with
    `ready` VMs per pool."""
    pools = {name: {"ready": n, "starting": 0, "busy": 0} for name, n in (ready or {}).items()}
    beat = {
        "host": host,
        "at": time.time(),
        "started_at": time.time(),
        "sessions": 0,
        "vms": vms,
        "max_vms": max_vms,
        "template": "ready",
        "pools": pools,
        "pool_errors": {},
        "driver": {"libvirt": {"ok": libvirt_ok}},
    }
    if memory is not None:
        beat["memory"] = memory
    r.sadd(keys.hosts(), host)
    r.set(keys.host_heartbeat(host), json.dumps(beat), px=int(ttl_s * 1000))


def unit_settings(**overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "redis_url": "redis://127.0.0.1:1/0",
        "home": "/tmp/shoal-unit",
        "host_name": HOST,
    }
    return Settings(**(base | overrides))


def unit_context(settings: Settings | None = None, celery: Callable | None = None) -> Context:
    """A Context on one fakeredis server (text and binary clients) and a recording Celery."""
    server = fakeredis.FakeServer()
    return Context(
        settings=settings or unit_settings(),
        redis=fakeredis.FakeRedis(server=server, decode_responses=True),
        redis_bin=fakeredis.FakeRedis(server=server),
        celery=celery or RecordingCelery(),  # type: ignore[arg-type]
    )


def unit_app(settings: Settings | None = None) -> Flask:
    """The API's Flask app on a unit_context (fakeredis, a recording Celery)."""
    settings = settings or unit_settings()
    app = create_app(settings)
    app.extensions["shoal"] = unit_context(settings)
    return app


def live_session(c: Context, tenant: str = "t1", pool: str = "default") -> SessionEntry:
    """A session registered on HOST and marked active, as its host would leave it."""
    entry = sessions.create(c.redis, tenant, get_pool(c.settings, pool), HOST)
    sessions.set_state(c.redis, entry["id"], sessions.ACTIVE)
    entry["state"] = sessions.ACTIVE
    return entry
