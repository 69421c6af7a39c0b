"""How many ready VMs a host starts or lets go (pool/sizing.py): up to `ready_max` while memory
holds each new VM at its whole size above the reserve, nothing new below it, and only the VMs
above the target let go when the host is short."""

from __future__ import annotations

import pytest

from pool.sizing import ready_changes
from shoal import host_memory
from shoal.host_memory import HostMemory
from shoal.pools import Pool, _parse
from tests.unit.fakes import unit_settings

RESERVE = 2048
SMALL = Pool(name="a-small", memory_mib=512, ready_target=2, ready_max=10)
LARGE = Pool(name="b-large", memory_mib=2048, ready_target=1, ready_max=4)
FIXED = Pool(name="c-fixed", memory_mib=512, ready_target=3)


def spare(mib: int) -> HostMemory:
    return HostMemory(available_mib=RESERVE + mib, total_mib=24576, reserve_mib=RESERVE)


def test_a_host_with_room_fills_each_pool_to_its_max() -> None:
    changes = ready_changes([SMALL, LARGE, FIXED], {}, spare(100_000))
    assert changes == {"a-small": 10, "b-large": 4, "c-fixed": 3}


def test_what_a_pool_holds_or_is_starting_counts() -> None:
    changes = ready_changes([SMALL, FIXED], {"a-small": 7, "c-fixed": 3}, spare(100_000))
    assert changes == {"a-small": 3, "c-fixed": 0}


def test_spare_memory_is_shared_out_in_name_order_counting_each_vm_whole() -> None:
    # 3 small VMs (1536 MiB) fit, then 1 large one fits in what is left (2048 + 511)
    changes = ready_changes([LARGE, SMALL], {"a-small": 7}, spare(3 * 512 + 2048 + 511))
    assert changes == {"a-small": 3, "b-large": 1}


def test_even_the_target_waits_for_memory() -> None:
    assert ready_changes([FIXED], {}, spare(1024 + 100)) == {"c-fixed": 2}
    assert ready_changes([FIXED], {}, spare(0)) == {"c-fixed": 0}


def test_below_the_reserve_only_what_is_above_the_target_is_let_go() -> None:
    changes = ready_changes([SMALL, FIXED], {"a-small": 6, "c-fixed": 3}, spare(-1))
    assert changes == {"a-small": -4, "c-fixed": 0}
    assert ready_changes([SMALL], {"a-small": 1}, spare(-5000)) == {"a-small": 0}


def test_a_lowered_max_lets_go_of_the_excess_whatever_the_memory() -> None:
    lowered = Pool(name="a-small", memory_mib=512, ready_target=2, ready_max=3)
    assert ready_changes([lowered], {"a-small": 8}, spare(100_000)) == {"a-small": -5}


def test_a_pool_without_a_max_keeps_its_target() -> None:
    assert FIXED.ready_ceiling == 3
    assert ready_changes([FIXED], {"c-fixed": 1}, spare(100_000)) == {"c-fixed": 2}


def test_host_memory_reads_meminfo(tmp_path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  25165824 kB\nMemFree: 1 kB\nMemAvailable:   20971520 kB\n")
    found = host_memory.read(2048, meminfo)
    assert found == HostMemory(available_mib=20480, total_mib=24576, reserve_mib=2048)
    assert found.room_for(512) == (20480 - 2048) // 512
    assert host_memory.from_heartbeat({"memory": found.as_dict()}) == found
    assert host_memory.from_heartbeat({"memory": {"available_mib": "x"}}) is None
    assert host_memory.from_heartbeat({}) is None


def test_a_max_below_the_target_is_refused(tmp_path) -> None:
    path = tmp_path / "pools.toml"
    path.write_text("[pools.p]\nready_target = 3\nready_max = 2\n")
    with pytest.raises(SystemExit, match="ready_max is below ready_target"):
        _parse(path, unit_settings())
