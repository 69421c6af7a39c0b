"""Forks on fakeredis with scripted VMs: the use case registers each fork within the tenant's and
the pool's caps and ends them all when anything fails; the host runtime captures the parent at
its next free moment, starts the forks, and activates them or none; the kept fork base and its
lifecycle; batches from a session. The real VMs are forked in tests/integration (test_vm_driver,
test_forks)."""

from __future__ import annotations

import os
import time

import pytest

from shoal import batches, keys, queue, sessions, tenants
from shoal.errors import (
    ForkFailed,
    SessionLost,
    ShoalError,
    TenantSessionLimit,
    ValidationFailed,
)
from shoal.pools import get_pool
from shoal.use_cases import batches as batch_cases
from shoal.use_cases import sessions as session_cases
from tests.unit.fakes import (
    AnsweringCelery,
    FakeVMManager,
    live_session,
    publish_heartbeat,
    unit_context,
    unit_settings,
)
from workers.fork_base import ForkBase, ForkBases, copy_file
from workers.host import HostRuntime
from workers.vm_errors import VMLost, VMStartFailed


@pytest.fixture()
def vms():
    return FakeVMManager()


@pytest.fixture()
def c(vms):
    c = unit_context(unit_settings(host_max_vms=20), celery=AnsweringCelery())
    publish_heartbeat(c.redis)
    runtime = HostRuntime(c.settings, r=c.redis, rb=c.redis_bin, vms=vms)
    runtime.memory = lambda: _Roomy()  # type: ignore[method-assign]
    c.runtime = runtime  # type: ignore[attr-defined]
    c.celery.answer(queue.FORK_SESSION.name, lambda task: runtime.fork_session(**task.kwargs))
    c.celery.answer(queue.DESTROY_SESSION.name, lambda task: runtime.destroy_session(**task.kwargs))
    return c


class _Roomy:
    available_mib, reserve_mib = 100_000, 0

    def spare_mib(self) -> int:
        return self.available_mib - self.reserve_mib


@pytest.fixture()
def parent(c, vms):
    entry = live_session(c)
    vm = vms.create("vm_parent", None)
    c.runtime.session_vm[entry["id"]] = vm.vm_id
    c.redis.hset(keys.session(entry["id"]), "vm", vm.vm_id)
    return entry


def wait_for_threads(c) -> None:
    c.celery.join()
    threads = c.runtime._fork_threads
    if threads is not None:
        threads.shutdown(wait=True)
        c.runtime._fork_threads = None


def test_forks_are_new_active_sessions_of_the_parents_pool_and_host(c, vms, parent):
    forks = session_cases.fork_session(c, "t1", parent, 3)
    wait_for_threads(c)
    assert len(forks) == 3 and len({f["id"] for f in forks}) == 3
    for fork in forks:
        stored = sessions.load(c.redis, fork["id"])
        assert stored["state"] == sessions.ACTIVE
        assert (stored["pool"], stored["host"], stored["tenant"]) == ("default", "h1", "t1")
        assert sessions.public_view(stored)["forked_from"] == parent["id"]
        assert vms.get(stored["vm"]).forked_from == ("vm_parent", 1)
    assert vms.captures == 1  # one capture for all three
    assert sessions.count_for_tenant(c.redis, "t1") == 4
    assert vms.fork_bases.released == [vms.fork_bases.kept["vm_parent"]]
    assert sessions.load(c.redis, parent["id"])["state"] == sessions.ACTIVE  # it runs on


def test_forks_count_against_the_tenants_cap_and_none_stay_when_it_is_full(c, vms, parent):
    tenants.set_max_sessions(c.redis, "t1", 3)
    with pytest.raises(TenantSessionLimit):
        session_cases.fork_session(c, "t1", parent, 3)  # 1 + 3 > 3
    assert sessions.count_for_tenant(c.redis, "t1") == 1
    assert not c.celery.take(queue.FORK_SESSION.name)  # the host was never asked
    assert vms.captures == 0


def test_a_fork_that_fails_to_start_leaves_no_fork_at_all(c, vms, parent, monkeypatch):
    ids = iter(["vm_a", "vm_b"])
    monkeypatch.setattr("workers.host_forks.new_vm_id", lambda: next(ids))
    vms.fork_errors["vm_b"] = VMStartFailed("the guest agent did not answer")
    with pytest.raises(ForkFailed, match="starting a fork failed"):
        session_cases.fork_session(c, "t1", parent, 2)
    wait_for_threads(c)
    assert vms.get("vm_a") is None and vms.destroyed.get("vm_a")
    assert sessions.count_for_tenant(c.redis, "t1") == 1
    assert sessions.load(c.redis, parent["id"])["state"] == sessions.ACTIVE


def test_a_capture_that_loses_the_parent_marks_it_lost(c, vms, parent):
    vms.capture_error = VMLost("restoring it after a failed fork failed")
    with pytest.raises(SessionLost):
        session_cases.fork_session(c, "t1", parent, 1)
    wait_for_threads(c)
    assert sessions.load(c.redis, parent["id"])["state"] == sessions.LOST
    assert vms.destroyed.get("vm_parent")
    assert sessions.count_for_tenant(c.redis, "t1") == 1  # the lost parent only


def test_a_fork_request_given_up_before_its_turn_captures_nothing(c, vms, parent):
    entry = sessions.create(c.redis, "t1", get_pool(c.settings, "default"), "h1")
    sessions.end(c.redis, entry, sessions.DELETED)  # its creator stopped waiting
    c.runtime.fork_session(parent["id"], "default", [entry["id"]], "reply-1", False)
    assert vms.captures == 0 and "given up" in c.redis.lpop("reply-1")
    assert c.runtime._forks_reserved == c.runtime._forks_reserved_mib == 0


def test_room_is_reserved_in_memory_as_well_as_in_vms(c, vms, parent):
    c.runtime.memory = lambda: _Roomy()  # 100,000 MiB: room for 194 VMs of 512 MiB and a capture
    c.runtime._forks_reserved_mib = 100_000 - 3 * 512  # another request's forks of a big pool
    with pytest.raises(ShoalError, match="short of memory for 3 forks"):
        session_cases.fork_session(c, "t1", parent, 3)  # 3 forks + the capture: 4 x 512 MiB
    session_cases.fork_session(c, "t1", parent, 2)
    wait_for_threads(c)
    assert c.runtime._forks_reserved == 0 and c.runtime._forks_reserved_mib == 100_000 - 1536


def test_a_host_without_room_refuses_before_capturing(c, vms, parent):
    c.runtime.settings = unit_settings(host_max_vms=3)
    with pytest.raises(ShoalError, match="SHOAL_HOST_MAX_VMS"):
        session_cases.fork_session(c, "t1", parent, 3)
    wait_for_threads(c)
    assert vms.captures == 0 and sessions.count_for_tenant(c.redis, "t1") == 1


def test_a_kept_base_serves_only_forks_that_ask_for_it_and_only_until_the_parent_runs(
    c, vms, parent
):
    session_cases.fork_session(c, "t1", parent, 1, reuse=True)
    session_cases.fork_session(c, "t1", parent, 1, reuse=True)
    wait_for_threads(c)
    assert vms.captures == 1
    session_cases.fork_session(c, "t1", parent, 1)  # an API fork: the parent as it is now
    wait_for_threads(c)
    assert vms.captures == 2
    c.runtime._vm(parent["id"], get_pool(c.settings, "default"))  # an execution, say
    assert "vm_parent" not in vms.fork_bases.kept  # it ran something: the base went
    session_cases.fork_session(c, "t1", parent, 1, reuse=True)
    wait_for_threads(c)
    assert vms.captures == 3


def test_another_tenants_session_cannot_be_forked_or_batched_from(c, parent):
    with pytest.raises(ShoalError, match="no session"):
        sessions.get_for_tenant(c.redis, "t2", parent["id"])
    with pytest.raises(ShoalError, match="no session"):
        batch_cases.submit_batch(c, "t2", None, [{"code": "1"}], 2, from_session=parent["id"])


def test_a_batch_from_a_session_runs_in_its_pool_and_says_so(c, parent):
    meta = batch_cases.submit_batch(c, "t1", None, [{"code": "1"}], 2, from_session=parent["id"])
    assert meta["pool"] == "default" and meta["from_session"] == parent["id"]
    assert batches.view(c.redis, meta)["from_session"] == parent["id"]
    with pytest.raises(ValidationFailed, match="leave pool out"):
        batch_cases.submit_batch(c, "t1", "other", [{"code": "1"}], 2, from_session=parent["id"])
    plain = batch_cases.submit_batch(c, "t1", None, [{"code": "1"}], 2)
    assert plain["pool"] == "default" and batches.view(c.redis, plain)["from_session"] is None


# --- fork bases ------------------------------------------------------------------------------
def _base(tmp_path, name: str) -> ForkBase:
    directory = tmp_path / name
    directory.mkdir()
    (directory / "state.save").write_bytes(b"image")
    return ForkBase(directory, "dom", "uuid", "<domain/>", 512, memory=os.memfd_create(name))


def test_a_base_in_use_is_closed_only_once_its_forks_are_up(tmp_path):
    bases = ForkBases(keep_s=60)
    base = _base(tmp_path, "a")
    bases.put("p", base, keep=True)  # in use by the forks being started
    bases.drop("p")  # the parent ran something meanwhile
    assert base.dir.exists() and base.memory >= 0
    assert bases.dirs() == {base.dir}  # the sweep spares it while forks start from it
    bases.release(base)
    assert not base.dir.exists() and base.memory == -1
    assert bases.take("p") is None and bases.dirs() == set()


def test_a_base_not_kept_is_closed_once_its_forks_are_up(tmp_path):
    bases = ForkBases(keep_s=60)
    base = _base(tmp_path, "once")
    bases.put("p", base, keep=False)  # an API fork: the parent as it is now, every time
    assert bases.take("p") is None
    bases.release(base)
    assert not base.dir.exists() and bases.dirs() == set()


def test_a_newer_base_replaces_the_kept_one_and_idle_bases_expire(tmp_path):
    bases = ForkBases(keep_s=60)
    old, new = _base(tmp_path, "old"), _base(tmp_path, "new")
    bases.put("p", old, keep=True)
    bases.release(old)
    bases.put("p", new, keep=True)
    bases.release(new)
    assert not old.dir.exists() and bases.take("p") is new
    bases.release(new)
    assert bases.dirs() == {new.dir}
    new.used_at = time.monotonic() - 61
    bases.expire()
    assert not new.dir.exists() and bases.dirs() == set()


def test_copy_file_never_writes_through_an_existing_path(tmp_path):
    source = tmp_path / "disk"
    source.write_bytes(b"x" * 10 + b"\0" * (1 << 20) + b"y")
    target = tmp_path / "copy"
    copy_file(source, target)
    assert target.read_bytes() == source.read_bytes()
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FileExistsError):
        copy_file(source, tmp_path / "link")
    assert not (tmp_path / "elsewhere").exists()


def test_forks_whose_recording_fails_are_all_destroyed(c, vms, parent, monkeypatch):
    calls = []

    def activate(r, session_id, vm_id, warm):
        calls.append(vm_id)
        if len(calls) == 2:
            raise ConnectionError("Redis went away")
        return True

    monkeypatch.setattr("workers.host_forks.sessions.activate", activate)
    with pytest.raises(ShoalError, match="no fork was made"):
        session_cases.fork_session(c, "t1", parent, 2)
    wait_for_threads(c)
    assert all(vms.get(vm_id) is None and vms.destroyed.get(vm_id) for vm_id in calls)
    assert c.runtime._forks_reserved == c.runtime._forks_reserved_mib == 0
    assert sessions.count_for_tenant(c.redis, "t1") == 1
