"""Placement (shoal/placement.py) on fakeredis: a new session goes to a live host with ready VMs
of its pool (the most ready), else to the least-loaded live host with room; silent hosts and
hosts whose libvirt is down get nothing.

Heartbeats are published as workers/host.py beat_once publishes them (tests/unit/fakes.py).
"""

from __future__ import annotations

import time

import fakeredis
import pytest

from shoal import keys
from shoal.errors import NoHostAvailable
from shoal.placement import choose_host
from tests.unit.fakes import publish_heartbeat


@pytest.fixture()
def r():
    return fakeredis.FakeRedis(decode_responses=True)


def test_the_host_with_the_most_ready_vms_of_the_pool_wins(r) -> None:
    publish_heartbeat(r, "h1", ready={"default": 1}, vms=30)
    publish_heartbeat(r, "h2", ready={"default": 3}, vms=40)
    publish_heartbeat(r, "h3", ready={"other": 9}, vms=0)
    assert choose_host(r, "default") == "h2"


def test_a_ready_vm_beats_a_lighter_load(r) -> None:
    publish_heartbeat(r, "h1", vms=0)
    publish_heartbeat(r, "h2", ready={"default": 1}, vms=47)
    assert choose_host(r, "default") == "h2"


def test_without_ready_vms_the_least_loaded_host_with_room_wins(r) -> None:
    publish_heartbeat(r, "h1", vms=2, max_vms=2)  # full, though the lightest
    publish_heartbeat(r, "h2", vms=9)
    publish_heartbeat(r, "h3", vms=5)
    publish_heartbeat(r, "h4", ready={"other": 2}, vms=7)  # ready VMs of another pool only
    assert choose_host(r, "default") == "h3"


def test_a_host_whose_heartbeat_expired_gets_nothing(r) -> None:
    publish_heartbeat(r, "h1", ready={"default": 5}, vms=1, ttl_s=0.01)
    publish_heartbeat(r, "h2", vms=20)
    time.sleep(0.02)
    assert r.sismember(keys.hosts(), "h1")  # still registered, only silent
    assert choose_host(r, "default") == "h2"


def test_a_host_whose_libvirt_is_down_gets_nothing(r) -> None:
    publish_heartbeat(r, "h1", ready={"default": 5}, libvirt_ok=False)
    publish_heartbeat(r, "h2", vms=20)
    assert choose_host(r, "default") == "h2"


def test_no_host_up_is_no_host_available(r) -> None:
    with pytest.raises(NoHostAvailable, match="no worker host is up"):
        choose_host(r, "default")
    publish_heartbeat(r, "h1", ready={"default": 1}, ttl_s=0.01)
    publish_heartbeat(r, "h2", ready={"default": 1}, libvirt_ok=False)
    time.sleep(0.02)
    with pytest.raises(NoHostAvailable, match="no worker host is up"):
        choose_host(r, "default")


def test_every_host_full_is_no_host_available(r) -> None:
    publish_heartbeat(r, "h1", vms=4, max_vms=4)
    publish_heartbeat(r, "h2", vms=5, max_vms=4)
    with pytest.raises(NoHostAvailable, match="SHOAL_HOST_MAX_VMS"):
        choose_host(r, "default")
