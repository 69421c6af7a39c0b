"""Sleeping sessions on fakeredis with scripted VMs: the pool settings, the registry's states and
clocks, what beat's expiry does with a pool that sleeps, the use cases' answers, and the host
runtime putting a session to sleep and waking it for the next execution."""

from __future__ import annotations

import pytest

from pool.expiry import expire_idle
from shoal import executions, keys, queue, sessions
from shoal.errors import SleepingHostDown, SleepNotEnabled
from shoal.pools import get_pool
from shoal.use_cases import executions as execution_cases
from shoal.use_cases import sessions as session_cases
from tests.unit.fakes import (
    HOST,
    FakeVMManager,
    live_session,
    publish_heartbeat,
    unit_context,
    unit_settings,
)
from workers import host_sleep
from workers.host import HostRuntime
from workers.vm_errors import VMError

POOLS_TOML = """
[pools.nap]
cooldown_s = 60
max_lifetime_s = 3600
on_idle = "sleep"
sleep_retention_s = 100
"""
PARAMS = {"code": "1 + 1", "language": "python", "timeout_s": 5, "max_output": 1000}


@pytest.fixture()
def c(tmp_path):
    pools_file = tmp_path / "pools.toml"
    pools_file.write_text(POOLS_TOML)
    c = unit_context(unit_settings(pools_file=str(pools_file)))
    publish_heartbeat(c.redis)
    return c


@pytest.fixture()
def vms():
    return FakeVMManager()


@pytest.fixture()
def runtime(c, vms):
    return HostRuntime(c.settings, r=c.redis, rb=c.redis_bin, vms=vms)


@pytest.fixture()
def napper(c, vms, runtime):
    """An active session of the sleeping pool, its VM a scripted FakeVM."""
    entry = live_session(c, pool="nap")
    vm = vms.create("vm_1", None)
    runtime.session_vm[entry["id"]] = vm.vm_id
    c.redis.hset(keys.session(entry["id"]), "vm", vm.vm_id)
    return entry


def score(c, key: str, session_id: str) -> float | None:
    return c.redis.zscore(key, session_id)


def test_pools_sleep_only_when_asked_and_say_how_long(c, tmp_path):
    assert get_pool(c.settings, "default").on_idle == "destroy"
    nap = get_pool(c.settings, "nap")
    assert (nap.on_idle, nap.sleep_retention_s) == ("sleep", 100)
    assert get_pool(c.settings, "default").to_dict()["sleep_retention_s"] == 7 * 86400
    for bad in ('on_idle = "hibernate"', "sleep_retention_s = 0"):
        path = tmp_path / "bad.toml"
        path.write_text(f"[pools.x]\n{bad}\n")
        with pytest.raises(SystemExit, match="pool 'x'"):
            get_pool(unit_settings(pools_file=str(path)), "x")


def test_asleep_stops_the_idle_and_lifetime_clocks_and_starts_retention(c, napper):
    sid = napper["id"]
    assert sessions.asleep(c.redis, sid, "t1", 100, 300 << 20)
    entry = sessions.load(c.redis, sid)
    assert entry["state"] == sessions.SLEEPING
    assert score(c, keys.session_deadlines(), sid) is None
    assert score(c, keys.session_lifetimes(), sid) is None
    assert score(c, keys.sleep_deadlines(), sid) == pytest.approx(float(entry["slept_at"]) + 100)
    view = sessions.public_view(entry)
    assert view["state"] == "sleeping" and view["expires_at"] == view["sleep_expires_at"]
    assert view["slept_at"]
    assert not sessions.asleep(c.redis, sid, "t1", 100, 1)  # only an active session falls asleep

    assert sessions.set_waking(c.redis, sid)
    assert sessions.awake(c.redis, sid, get_pool(c.settings, "nap"))
    entry = sessions.load(c.redis, sid)
    assert entry["state"] == sessions.ACTIVE and "slept_at" not in entry
    assert score(c, keys.sleep_deadlines(), sid) is None
    assert score(c, keys.session_deadlines(), sid) is not None


def test_an_ended_session_is_never_woken_back(c, napper):
    sessions.asleep(c.redis, napper["id"], "t1", 100, 1)
    session_cases.delete_session(c, sessions.load(c.redis, napper["id"]))
    assert not sessions.set_waking(c.redis, napper["id"])
    assert not sessions.awake(c.redis, napper["id"], get_pool(c.settings, "nap"))
    assert sessions.load(c.redis, napper["id"])["state"] == sessions.DELETED
    assert score(c, keys.sleep_deadlines(), napper["id"]) is None


def test_beat_puts_an_idle_session_of_a_sleeping_pool_to_sleep(c, napper):
    sid = napper["id"]
    now = float(napper["created_at"]) + 61
    assert expire_idle(c, now=now) == []
    (task,) = c.celery.take(queue.SLEEP_SESSION.name)
    assert task.kwargs == {"session_id": sid, "pool_name": "nap"}
    assert task.queue == keys.host_queue(HOST)
    assert sessions.load(c.redis, sid)["state"] == sessions.ACTIVE  # until the image is complete
    assert expire_idle(c, now=now + 1) == []  # asked once, not at every beat
    assert c.celery.take(queue.SLEEP_SESSION.name) == []


def test_beat_ends_a_session_past_its_lifetime_or_its_retention(c, napper):
    assert expire_idle(c, now=float(napper["created_at"]) + 3601) == [napper["id"]]
    other = live_session(c, pool="nap")
    sessions.asleep(c.redis, other["id"], "t1", 100, 1)
    assert expire_idle(c, now=float(other["created_at"]) + 99) == []
    assert expire_idle(c, now=float(other["created_at"]) + 101) == [other["id"]]
    assert sessions.load(c.redis, other["id"])["state"] == sessions.EXPIRED
    destroyed = [t.kwargs["session_id"] for t in c.celery.take(queue.DESTROY_SESSION.name)]
    assert destroyed == [napper["id"], other["id"]]  # the host removes the VM and its image


def test_a_pool_that_does_not_sleep_refuses_to_put_a_session_to_sleep(c):
    entry = live_session(c)
    with pytest.raises(SleepNotEnabled) as info:
        session_cases.sleep_session(c, entry)
    assert info.value.status == 409 and "on_idle" in info.value.message
    assert c.celery.take(queue.SLEEP_SESSION.name) == []


def test_time_asleep_does_not_count_against_the_lifetime(c, napper):
    sid = napper["id"]
    lifetime_end = score(c, keys.session_lifetimes(), sid)
    sessions.asleep(c.redis, sid, "t1", 100, 1)
    slept_at = float(sessions.load(c.redis, sid)["slept_at"])
    sessions.set_waking(c.redis, sid)
    assert score(c, keys.sleep_deadlines(), sid) is None  # retention cannot end it mid-wake
    sessions.awake(c.redis, sid, get_pool(c.settings, "nap"))
    woke_at = float(sessions.load(c.redis, sid)["last_used_at"])
    left = lifetime_end - slept_at
    assert score(c, keys.session_lifetimes(), sid) == pytest.approx(woke_at + left, abs=0.01)


def test_sleep_and_wake_requests_go_to_the_host_only_when_they_change_something(c, napper):
    session_cases.sleep_session(c, napper)
    assert len(c.celery.take(queue.SLEEP_SESSION.name)) == 1
    session_cases.wake_session(c, napper)  # awake already
    assert c.celery.take(queue.WAKE_SESSION.name) == []
    sessions.asleep(c.redis, napper["id"], "t1", 100, 1)
    asleep = sessions.load(c.redis, napper["id"])
    session_cases.sleep_session(c, asleep)
    assert c.celery.take(queue.SLEEP_SESSION.name) == []
    session_cases.wake_session(c, asleep)
    assert len(c.celery.take(queue.WAKE_SESSION.name)) == 1


def test_a_sleeping_session_on_a_silent_host_is_kept_and_answered_503(c, napper):
    sessions.asleep(c.redis, napper["id"], "t1", 100, 1)
    c.redis.delete(keys.host_heartbeat(HOST))
    asleep = sessions.load(c.redis, napper["id"])
    for call in (
        lambda: session_cases.wake_session(c, asleep),
        lambda: execution_cases.submit_execution(c, asleep, PARAMS),
    ):
        with pytest.raises(SleepingHostDown) as info:
            call()
        assert info.value.status == 503 and info.value.retry_after_s
    assert sessions.load(c.redis, napper["id"])["state"] == sessions.SLEEPING


def test_the_host_sleeps_a_session_and_the_next_execution_wakes_it(c, vms, runtime, napper):
    sid = napper["id"]
    runtime.sleep_session(sid, "nap")
    assert sessions.load(c.redis, sid)["state"] == sessions.SLEEPING
    assert vms.is_asleep("vm_1") and vms.get("vm_1") is None
    assert "vm_1" in runtime._owned_vm_ids()  # the sweep keeps its files

    record = execution_cases.submit_execution(c, sessions.load(c.redis, sid), PARAMS)
    (task,) = c.celery.take(queue.EXECUTE.name)
    runtime.execute(**task.kwargs)
    assert executions.load(c.redis, record["id"])["status"] == executions.SUCCEEDED
    assert sessions.load(c.redis, sid)["state"] == sessions.ACTIVE
    assert vms.get("vm_1") is not None and not vms.is_asleep("vm_1")


def test_a_session_deleted_while_it_fell_asleep_is_destroyed(c, vms, runtime, napper):
    save = vms.sleep

    def deleted_meanwhile(vm_id):
        image = save(vm_id)
        session_cases.delete_session(c, napper)
        return image

    vms.sleep = deleted_meanwhile
    runtime.sleep_session(napper["id"], "nap")
    assert not vms.is_asleep("vm_1") and vms.get("vm_1") is None  # nobody would wake it
    assert sessions.load(c.redis, napper["id"])["state"] == sessions.DELETED


def test_a_failed_sleep_leaves_the_session_active_and_tries_again_later(c, vms, runtime, napper):
    def broken(vm_id):
        raise RuntimeError("libvirt: save failed")

    vms.sleep = broken
    runtime.sleep_session(napper["id"], "nap")
    assert sessions.load(c.redis, napper["id"])["state"] == sessions.ACTIVE
    assert vms.get("vm_1") is not None
    assert score(c, keys.session_deadlines(), napper["id"]) is not None


def test_a_failed_wake_leaves_the_session_asleep_with_its_image(c, vms, runtime, napper):
    sid = napper["id"]
    runtime.sleep_session(sid, "nap")
    vms.wake_error = VMError("restore failed: out of memory")
    record = execution_cases.submit_execution(c, sessions.load(c.redis, sid), PARAMS)
    (task,) = c.celery.take(queue.EXECUTE.name)
    runtime.execute(**task.kwargs)
    failed = executions.load(c.redis, record["id"])
    assert failed["status"] == executions.FAILED, failed
    entry = sessions.load(c.redis, sid)
    assert entry["state"] == sessions.SLEEPING and vms.is_asleep("vm_1")
    assert score(c, keys.sleep_deadlines(), sid) == pytest.approx(float(entry["sleep_expires_at"]))
    vms.wake_error = None
    assert submit_and_run_ok(c, runtime, sid)
    assert sessions.load(c.redis, sid)["state"] == sessions.ACTIVE and not vms.is_asleep("vm_1")


def submit_and_run_ok(c, runtime, sid) -> bool:
    record = execution_cases.submit_execution(c, sessions.load(c.redis, sid), PARAMS)
    (task,) = c.celery.take(queue.EXECUTE.name)
    runtime.execute(**task.kwargs)
    return executions.load(c.redis, record["id"])["status"] == executions.SUCCEEDED


def test_a_restarted_worker_keeps_a_sleeping_sessions_files_and_does_not_lose_it(
    c, vms, runtime, napper
):
    runtime.sleep_session(napper["id"], "nap")
    restarted = HostRuntime(c.settings, r=c.redis, rb=c.redis_bin, vms=vms)
    restarted.reconcile()
    assert "vm_1" in vms.reconciled_with  # known: its directory is kept
    assert sessions.load(c.redis, napper["id"])["state"] == sessions.SLEEPING
    assert "vm_1" not in vms.destroyed
    assert submit_and_run_ok(c, restarted, napper["id"])  # woken by the new worker


def test_usage_meters_time_asleep_apart(c, napper, monkeypatch):
    sid = napper["id"]
    created = float(napper["created_at"])
    clock = [created + 10]
    monkeypatch.setattr(sessions.time, "time", lambda: clock[0])
    sessions.asleep(c.redis, sid, "t1", 100, 1)  # 10 s awake, then asleep
    clock[0] += 30
    row = sessions.usage(c.redis, "t1")["nap"]
    assert (row["session_seconds"], row["sleeping_seconds"]) == (10.0, 30.0)
    assert (row["live_sessions"], row["sleeping_sessions"]) == (1, 1)
    sessions.set_waking(c.redis, sid)
    sessions.awake(c.redis, sid, get_pool(c.settings, "nap"))
    clock[0] += 5
    row = sessions.usage(c.redis, "t1")["nap"]
    assert (row["session_seconds"], row["sleeping_seconds"], row["sleeping_sessions"]) == (
        15.0, 30.0, 0,
    )  # fmt: skip
    session_cases.delete_session(c, sessions.load(c.redis, sid))
    row = sessions.usage(c.redis, "t1")["nap"]
    assert (row["session_seconds"], row["sleeping_seconds"], row["live_sessions"]) == (
        15.0, 30.0, 0,
    )  # fmt: skip


def test_the_oldest_sleeping_sessions_end_first_to_make_room():
    held = [("old", 300), ("mid", 300), ("new", 300)]
    assert host_sleep.oldest_to_end(held, 300, 1000) == ["old"]
    assert host_sleep.oldest_to_end(held, 300, 1200) == []
    assert host_sleep.oldest_to_end(held, 900, 1000) == ["old", "mid", "new"]
    assert host_sleep.oldest_to_end(held, 1001, 1000) is None  # it cannot fit even alone


def sleeping_session(c, vms, runtime, vm_id: str) -> str:
    entry = live_session(c, pool="nap")
    vms.create(vm_id, None)
    runtime.session_vm[entry["id"]] = vm_id
    c.redis.hset(keys.session(entry["id"]), "vm", vm_id)
    runtime.sleep_session(entry["id"], "nap")
    return entry["id"]


def test_a_tenant_over_its_sleeping_bytes_loses_its_oldest_sleeper(c, vms, monkeypatch):
    settings = unit_settings(pools_file=c.settings.pools_file, tenant_max_sleep_mib=700)
    runtime = HostRuntime(settings, r=c.redis, rb=c.redis_bin, vms=vms)
    monkeypatch.setattr(host_sleep, "celery_for", lambda _settings: c.celery)
    first = sleeping_session(c, vms, runtime, "vm_a")  # each image: 300 MiB (FakeVMManager)
    second = sleeping_session(c, vms, runtime, "vm_b")
    assert [sid for sid, _size in sessions.sleepers(c.redis, "t1")] == [first, second]
    third = sleeping_session(c, vms, runtime, "vm_c")
    assert sessions.load(c.redis, first)["state"] == sessions.EXPIRED
    (task,) = c.celery.take(queue.DESTROY_SESSION.name)
    assert task.kwargs == {"session_id": first}  # its host removes its image
    assert [sid for sid, _size in sessions.sleepers(c.redis, "t1")] == [second, third]


def test_an_image_over_the_whole_cap_ends_its_session_instead(c, vms):
    settings = unit_settings(pools_file=c.settings.pools_file, tenant_max_sleep_mib=200)
    runtime = HostRuntime(settings, r=c.redis, rb=c.redis_bin, vms=vms)
    session_id = sleeping_session(c, vms, runtime, "vm_big")
    assert sessions.load(c.redis, session_id)["state"] == sessions.EXPIRED
    assert vms.destroyed == {"vm_big": 1} and not vms.is_asleep("vm_big")


def test_a_host_at_its_sleeping_cap_ends_a_session_instead_of_another_tenants(c, vms):
    # 1 GiB: two images of 300 MiB fit; a third, which may be as large as its VM's 512 MiB, not.
    settings = unit_settings(pools_file=c.settings.pools_file, host_max_sleep_mib=1024)
    runtime = HostRuntime(settings, r=c.redis, rb=c.redis_bin, vms=vms)
    kept = [sleeping_session(c, vms, runtime, vm_id) for vm_id in ("vm_1a", "vm_1b")]
    ended = sleeping_session(c, vms, runtime, "vm_1c")
    assert [sessions.load(c.redis, sid)["state"] for sid in kept] == [sessions.SLEEPING] * 2
    assert sessions.load(c.redis, ended)["state"] == sessions.EXPIRED
    assert vms.destroyed == {"vm_1c": 1}
