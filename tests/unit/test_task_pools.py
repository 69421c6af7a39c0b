"""A task is no authority on pools. Whoever can queue tasks (someone who reached Redis) may name
a pool and describe one: the worker reads the pool's definition, network included, from its own
configuration by name; a name it does not know is refused; anything else a task carries about a
pool is refused before the task runs or never read."""

from __future__ import annotations

import inspect
import json

import pytest

from shoal import executions, keys, queue, sessions
from shoal.pools import get_pool
from shoal.use_cases import executions as execution_cases
from tests.unit.fakes import FakeVMManager, live_session, unit_context
from workers import tasks
from workers.host import HostRuntime, spec_for

FORGED_POOL = {"name": "default", "network": True, "memory_mib": 65536, "image": "/etc/shadow"}


@pytest.fixture()
def c():
    return unit_context()


@pytest.fixture()
def vms():
    made = FakeVMManager()
    made.specs = []  # type: ignore[attr-defined]
    create = made.create

    def recording_create(vm_id, spec):
        made.specs.append(spec)  # type: ignore[attr-defined]
        return create(vm_id, spec)

    def recording_attach(vm_id, spec):
        """The session's VM, found again through libvirt with the spec the worker chose."""
        made.specs.append(spec)  # type: ignore[attr-defined]
        return create(vm_id, spec)

    made.create = recording_create  # type: ignore[method-assign]
    made.attach = recording_attach  # type: ignore[method-assign]
    return made


@pytest.fixture()
def runtime(c, vms):
    return HostRuntime(c.settings, r=c.redis, rb=c.redis_bin, vms=vms)


def host_tasks() -> list[queue.Task]:
    return [t for t in vars(queue).values() if isinstance(t, queue.Task)]


def test_every_task_takes_exactly_its_declared_arguments_and_no_pool_object() -> None:
    """No task function has **kwargs or a parameter beyond shoal/queue.py's list, so a task
    that carries a `pool` description (or any other extra) fails before it runs."""
    from workers import async_tasks  # noqa: F401  (registers the other workers' tasks)

    registered = {t.name: t for t in tasks.execute.app.tasks.values()}
    for declared in host_tasks():
        function = registered[declared.name].run
        parameters = inspect.signature(function).parameters.values()
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters), declared.name
        assert tuple(p.name for p in parameters) == declared.arguments, declared.name
        assert "pool" not in declared.arguments
    with pytest.raises(TypeError):
        tasks.create_session(session_id="s", pool_name="default", reply_key="r", pool=FORGED_POOL)


def test_sending_refuses_extra_arguments(c) -> None:
    with pytest.raises(TypeError):
        queue.CREATE_SESSION.send(
            c.celery, host="h1", session_id="s", pool_name="default", reply_key="r",
            pool=FORGED_POOL,
        )  # fmt: skip


def test_an_unknown_pool_is_refused_and_no_vm_is_made(c, runtime, vms) -> None:
    entry = sessions.create(c.redis, "t1", get_pool(c.settings, "default"), "h1")
    runtime.create_session(entry["id"], "no-such-pool", "reply:1")
    answer = json.loads(c.redis.lpop("reply:1"))
    assert answer["ok"] is False and "no-such-pool" in json.dumps(answer)
    assert vms.vms == {} and vms.specs == []


def test_the_vm_is_made_from_the_configured_pool(c, runtime, vms) -> None:
    entry = sessions.create(c.redis, "t1", get_pool(c.settings, "default"), "h1")
    runtime.create_session(entry["id"], "default", "reply:1")
    assert json.loads(c.redis.lpop("reply:1"))["ok"] is True
    (spec,) = vms.specs
    assert spec == spec_for(get_pool(c.settings, "default"))
    assert spec.network is False


def test_pool_fields_inside_an_executions_record_are_never_read(c, runtime, vms) -> None:
    """The EXECUTE task carries the record; a record that says `network: true` or carries a
    whole pool changes nothing: the VM is found or made from the configured pool."""
    entry = live_session(c)
    c.redis.hset(keys.session(entry["id"]), "vm", "vm_1")  # not known to this worker yet
    params = {"code": "1 + 1", "language": "python", "timeout_s": 5, "max_output": 100}
    record = execution_cases.submit_execution(c, entry, params)
    (task,) = c.celery.take(queue.EXECUTE.name)
    carried = json.loads(task.kwargs["record_json"])
    carried.update(pool=FORGED_POOL, network=True, image="/etc/shadow", memory_mib=65536)
    runtime.execute(execution_id=record["id"], pool_name="default", record_json=json.dumps(carried))
    final = executions.load(c.redis, record["id"])
    assert final["status"] == executions.SUCCEEDED, final
    (spec,) = vms.specs
    assert spec == spec_for(get_pool(c.settings, "default")) and spec.network is False


def test_an_execution_naming_an_unknown_pool_ends_failed(c, runtime, vms) -> None:
    entry = live_session(c)
    params = {"code": "1", "language": "python", "timeout_s": 5, "max_output": 100}
    record = execution_cases.submit_execution(c, entry, params)
    (task,) = c.celery.take(queue.EXECUTE.name)
    runtime.execute(**{**task.kwargs, "pool_name": "no-such-pool"})
    final = executions.load(c.redis, record["id"])
    assert final["status"] == executions.FAILED
    assert "PoolNotFound" in final["error"]["value"]
    assert vms.specs == []
    assert not c.redis.zcard(keys.session_executions(entry["id"]))
