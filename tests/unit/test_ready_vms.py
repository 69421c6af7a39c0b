"""A host's ready VMs (pool/ready.py): each ready VM is handed out once, even to concurrent
takers; replenishing tops each pool up to its target with at most `max_parallel` restores at a
time; a pool whose restores fail backs off exponentially and says why; ready VMs let go leave
newest first and are never handed out again.

`start_vm` is a stand-in that returns (or raises) when told; the back-off runs on a fake clock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from pool import ready as ready_mod
from pool.ready import BACKOFF_FIRST_S, BACKOFF_MAX_S, ReadyVMs
from shoal.pools import Pool

POOL = Pool(name="p", ready_target=3)


def targets(pools: list[Pool]) -> list[tuple[Pool, int]]:
    return [(pool, pool.ready_target) for pool in pools]


def wait_for(condition: Callable[[], bool], timeout_s: float = 2.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.001)


class Starts:
    """start_vm: records each VM started; blocks while `gate` is clear; raises `error` if set."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.gate = threading.Event()
        self.gate.set()
        self.error: Exception | None = None
        self.active = 0
        self.most_active = 0
        self._lock = threading.Lock()

    def __call__(self, vm_id: str, pool: Pool) -> None:
        with self._lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        try:
            assert self.gate.wait(5)
            if self.error is not None:
                raise self.error
            with self._lock:
                self.started.append(vm_id)
        finally:
            with self._lock:
                self.active -= 1


def filled(pools: list[Pool], max_parallel: int = 2) -> tuple[ReadyVMs, Starts]:
    starts = Starts()
    ready = ReadyVMs(starts, max_parallel)
    ready.replenish(targets(pools))
    for pool in pools:
        wait_for(lambda p=pool: ready.counts()[p.name]["ready"] == p.ready_target)
    return ready, starts


def test_take_hands_out_each_ready_vm_once() -> None:
    ready, starts = filled([POOL])
    assert ready.ids() == set(starts.started) and len(starts.started) == 3
    taken = [ready.take("p") for _ in range(3)]
    assert sorted(taken) == sorted(starts.started)
    assert ready.take("p") is None
    assert ready.take("other") is None
    assert ready.ids() == set()
    assert ready.counts()["p"] == {"ready": 0, "starting": 0, "failures": 0, "last_error": ""}


def test_concurrent_takers_never_share_a_vm() -> None:
    ready, starts = filled([Pool(name="p", ready_target=60)], max_parallel=8)
    barrier = threading.Barrier(8)
    hauls: list[list[str]] = [[] for _ in range(8)]

    def taker(haul: list[str]) -> None:
        barrier.wait()
        while (vm_id := ready.take("p")) is not None:
            haul.append(vm_id)

    threads = [threading.Thread(target=taker, args=(h,)) for h in hauls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    everything = [vm_id for haul in hauls for vm_id in haul]
    assert len(everything) == 60
    assert set(everything) == set(starts.started)


def test_ids_lists_the_ready_vms_of_every_pool() -> None:
    ready, starts = filled([POOL, Pool(name="q", ready_target=2)])
    assert ready.ids() == set(starts.started) and len(starts.started) == 5
    vm_id = ready.take("q")
    assert ready.ids() == set(starts.started) - {vm_id}


def test_replenish_starts_what_is_missing_with_at_most_max_parallel_at_once() -> None:
    starts = Starts()
    starts.gate.clear()
    ready = ReadyVMs(starts, max_parallel=2)
    pools = [Pool(name="p", ready_target=4), Pool(name="q", ready_target=2)]

    assert ready.replenish(targets(pools)) == 6
    wait_for(lambda: starts.active == 2)
    time.sleep(0.02)  # room for a third restore to sneak in, were the bound not kept
    assert starts.active == 2
    assert ready.counts()["p"]["starting"] == 4 and ready.counts()["q"]["starting"] == 2
    assert ready.replenish(targets(pools)) == 0  # what is starting counts towards the target

    starts.gate.set()
    wait_for(lambda: ready.counts()["p"]["ready"] == 4 and ready.counts()["q"]["ready"] == 2)
    assert starts.most_active == 2
    assert ready.counts()["p"]["starting"] == 0
    assert ready.replenish(targets(pools)) == 0

    ready.take("p")
    ready.take("p")
    assert ready.replenish(targets(pools)) == 2
    wait_for(lambda: ready.counts()["p"]["ready"] == 4)
    assert len(starts.started) == 8


def test_a_pool_without_a_target_starts_nothing() -> None:
    starts = Starts()
    ready = ReadyVMs(starts)
    assert ready.replenish(targets([Pool(name="p", ready_target=0)])) == 0
    assert starts.started == []


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture()
def clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(ready_mod, "time", clock)
    return clock


def test_failing_restores_back_off_exponentially_up_to_the_cap(clock) -> None:
    starts = Starts()
    starts.error = RuntimeError("restore failed: no snapshot")
    ready = ReadyVMs(starts)
    pool = Pool(name="p", ready_target=1)

    delay = 0.0
    for failures in range(1, 10):
        clock.now += delay
        assert ready.replenish(targets([pool])) == 1
        wait_for(lambda n=failures: ready.counts()["p"]["failures"] == n)
        assert ready.counts()["p"] == {
            "ready": 0,
            "starting": 0,
            "failures": failures,
            "last_error": "restore failed: no snapshot",
        }
        delay = min(BACKOFF_FIRST_S * 2 ** (failures - 1), BACKOFF_MAX_S)
        assert ready.replenish(targets([pool])) == 0  # backing off
        clock.now += delay - 0.01
        assert ready.replenish(targets([pool])) == 0
        clock.now -= delay - 0.01
    assert delay == BACKOFF_MAX_S

    starts.error = None  # the restore works again: the failures are forgotten
    clock.now += delay
    assert ready.replenish(targets([pool])) == 1
    wait_for(lambda: ready.counts()["p"]["ready"] == 1)
    assert ready.counts()["p"] == {"ready": 1, "starting": 0, "failures": 0, "last_error": ""}
    assert starts.started


def test_a_failing_pool_does_not_hold_back_another(clock) -> None:
    def start_vm(vm_id: str, pool: Pool) -> None:
        if pool.name == "broken":
            raise OSError("no such image")

    ready = ReadyVMs(start_vm)
    pools = [Pool(name="broken", ready_target=1), Pool(name="fine", ready_target=2)]
    assert ready.replenish(targets(pools)) == 3
    wait_for(lambda: ready.counts()["fine"]["ready"] == 2)
    wait_for(lambda: ready.counts()["broken"]["failures"] == 1)
    assert ready.counts()["broken"]["last_error"] == "no such image"
    ready.take("fine")
    assert ready.replenish(targets(pools)) == 1  # only the healthy pool, while the other backs off


def test_let_go_hands_back_the_newest_ready_vms_never_to_be_taken() -> None:
    ready, starts = filled([Pool(name="p", ready_target=4)], max_parallel=1)
    assert ready.held() == {"p": 4}
    released = ready.let_go("p", 2)
    assert released == starts.started[:1:-1]  # the two started last, newest first
    assert ready.let_go("other", 3) == []
    assert ready.held() == {"p": 2, "other": 0}
    assert {ready.take("p"), ready.take("p")} == set(starts.started[:2])
    assert ready.take("p") is None and ready.let_go("p", 5) == []


def test_each_vm_that_joins_its_pool_is_announced() -> None:
    starts = Starts()
    announced: list[set[str]] = []  # the pool as each announcement saw it
    ready = ReadyVMs(starts, 2, on_ready=lambda: announced.append(ready.ids()))
    ready.replenish(targets([Pool(name="p", ready_target=3)]))
    wait_for(lambda: len(announced) == 3)
    # One announcement per VM, each made once its VM was in the pool (two restores run at once,
    # so two announcements may see the same pool).
    assert set().union(*announced) == set(starts.started) and len(starts.started) == 3
    assert all(announced)


def test_a_failing_announcement_keeps_the_vm() -> None:
    def fail() -> None:
        raise RuntimeError("redis down")

    ready = ReadyVMs(Starts(), 2, on_ready=fail)
    ready.replenish(targets([Pool(name="p", ready_target=1)]))
    wait_for(lambda: ready.counts()["p"]["ready"] == 1)
    assert ready.take("p") is not None
