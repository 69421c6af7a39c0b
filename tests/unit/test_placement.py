"""Placement (shoal/placement.py) on fakeredis: a new session goes to a live host with ready VMs
of its pool (the most ready), else to the least-loaded live host with room; silent hosts and
hosts whose libvirt is down get nothing; a host's room is bounded by its VM limit and by the
memory it has above its reserve, counting the new VM at its whole size.

Heartbeats are published as workers/host.py beat_once publishes them (tests/unit/fakes.py).
"""

from __future__ import annotations

import time

import fakeredis
import pytest

from shoal import keys
from shoal.errors import NoHostAvailable
from shoal.placement import choose_host
from shoal.pools import Pool
from tests.unit.fakes import publish_heartbeat

DEFAULT = Pool(name="default", memory_mib=512)


@pytest.fixture()
def r():
    return fakeredis.FakeRedis(decode_responses=True)


def test_the_host_with_the_most_ready_vms_of_the_pool_wins(r) -> None:
    publish_heartbeat(r, "h1", ready={"default": 1}, vms=30)
    publish_heartbeat(r, "h2", ready={"default": 3}, vms=40)
    publish_heartbeat(r, "h3", ready={"other": 9}, vms=0)
    assert choose_host(r, DEFAULT) == "h2"


def test_a_ready_vm_beats_a_lighter_load(r) -> None:
    publish_heartbeat(r, "h1", vms=0)
    publish_heartbeat(r, "h2", ready={"default": 1}, vms=47)
    assert choose_host(r, DEFAULT) == "h2"


def test_without_ready_vms_the_least_loaded_host_with_room_wins(r) -> None:
    publish_heartbeat(r, "h1", vms=2, max_vms=2)  # full, though the lightest
    publish_heartbeat(r, "h2", vms=9)
    publish_heartbeat(r, "h3", vms=5)
    publish_heartbeat(r, "h4", ready={"other": 2}, vms=7)  # ready VMs of another pool only
    assert choose_host(r, DEFAULT) == "h3"


def test_a_host_whose_heartbeat_expired_gets_nothing(r) -> None:
    publish_heartbeat(r, "h1", ready={"default": 5}, vms=1, ttl_s=0.01)
    publish_heartbeat(r, "h2", vms=20)
    time.sleep(0.02)
    assert r.sismember(keys.hosts(), "h1")  # still registered, only silent
    assert choose_host(r, DEFAULT) == "h2"


def test_a_host_whose_libvirt_is_down_gets_nothing(r) -> None:
    publish_heartbeat(r, "h1", ready={"default": 5}, libvirt_ok=False)
    publish_heartbeat(r, "h2", vms=20)
    assert choose_host(r, DEFAULT) == "h2"


def test_no_host_up_is_no_host_available(r) -> None:
    with pytest.raises(NoHostAvailable, match="no worker host is up"):
        choose_host(r, DEFAULT)
    publish_heartbeat(r, "h1", ready={"default": 1}, ttl_s=0.01)
    publish_heartbeat(r, "h2", ready={"default": 1}, libvirt_ok=False)
    time.sleep(0.02)
    with pytest.raises(NoHostAvailable, match="no worker host is up"):
        choose_host(r, DEFAULT)


def test_every_host_full_is_no_host_available(r) -> None:
    publish_heartbeat(r, "h1", vms=4, max_vms=4)
    publish_heartbeat(r, "h2", vms=5, max_vms=4)
    with pytest.raises(NoHostAvailable, match="SHOAL_HOST_MAX_VMS"):
        choose_host(r, DEFAULT)


def memory(available_mib: int, reserve_mib: int = 2048) -> dict:
    return {"available_mib": available_mib, "total_mib": 24000, "reserve_mib": reserve_mib}


def test_the_host_with_the_most_memory_room_wins(r) -> None:
    publish_heartbeat(r, "h1", vms=2, memory=memory(2048 + 3 * 512))  # room for 3 VMs
    publish_heartbeat(r, "h2", vms=30, memory=memory(2048 + 10 * 512))  # room for 10
    publish_heartbeat(r, "h3", vms=40, max_vms=45, memory=memory(20000))  # 5 below its limit
    assert choose_host(r, DEFAULT) == "h2"


def test_a_host_whose_memory_cannot_hold_the_vm_above_its_reserve_gets_nothing(r) -> None:
    publish_heartbeat(r, "h1", vms=0, memory=memory(2048 + 511))
    publish_heartbeat(r, "h2", vms=40, memory=memory(2048 + 512))
    assert choose_host(r, DEFAULT) == "h2"
    big = Pool(name="default", memory_mib=1024)
    with pytest.raises(NoHostAvailable, match="short of memory for a 1024 MiB VM"):
        choose_host(r, big)


def test_a_ready_vm_is_taken_even_on_a_host_short_of_memory(r) -> None:
    """A ready VM already holds its memory: handing it out costs the host nothing more."""
    publish_heartbeat(r, "h1", ready={"default": 1}, memory=memory(100))
    publish_heartbeat(r, "h2", memory=memory(20000))
    assert choose_host(r, DEFAULT) == "h1"


def test_a_host_that_reports_no_memory_is_placed_by_its_vm_count(r) -> None:
    publish_heartbeat(r, "h1", vms=10)
    publish_heartbeat(r, "h2", vms=1, memory=memory(2048 + 512))  # room for one
    assert choose_host(r, DEFAULT) == "h1"
