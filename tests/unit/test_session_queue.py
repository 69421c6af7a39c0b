"""A session's work runs one piece at a time, in order, and waiting never holds a thread."""

from __future__ import annotations

import random
import threading
import time

from workers.session_queue import SessionQueues


def start_all(targets: list) -> list[threading.Thread]:
    threads = [threading.Thread(target=t) for t in targets]
    for t in threads:
        t.start()
    return threads


def test_executions_run_in_sequence_order_whatever_order_they_arrive_in() -> None:
    queues = SessionQueues()
    queues.start("s")
    ran: list[int] = []
    running: list[int] = []

    def work(seq: int):
        def run() -> None:
            running.append(seq)
            assert len(running) == 1, "two pieces of one session's work overlapped"
            time.sleep(0.002)
            ran.append(seq)
            running.remove(seq)

        return run

    order = list(range(1, 21))
    random.Random(7).shuffle(order)
    threads = start_all(
        [lambda s=seq: queues.execution("s", s, f"e{s}", work(s), lambda: 0) for seq in order]
    )
    for t in threads:
        t.join(timeout=10)
    deadline = time.monotonic() + 5
    while len(ran) < 20 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ran == list(range(1, 21))


def test_a_waiting_execution_returns_its_thread_at_once() -> None:
    queues = SessionQueues()
    queues.start("s")
    release = threading.Event()
    (first,) = start_all([lambda: queues.execution("s", 1, "e1", release.wait, lambda: 0)])
    time.sleep(0.05)
    assert queues.running_execution("s") == "e1"

    ran: list[int] = []
    started = time.monotonic()
    for seq in range(2, 42):  # more than a worker's threads, all behind the first
        queues.execution("s", seq, f"e{seq}", lambda s=seq: ran.append(s), lambda: 0)
    assert time.monotonic() - started < 0.5  # none of these calls waited
    assert queues.waiting("s") == 40 and ran == []

    release.set()
    first.join(timeout=5)  # the thread that ran the first runs the rest, in order
    assert ran == list(range(2, 42)) and queues.waiting("s") == 0


def test_file_operations_run_at_the_next_free_moment_before_waiting_executions() -> None:
    queues = SessionQueues()
    queues.start("s")
    events: list[str] = []
    release = threading.Event()

    def first() -> None:
        release.wait()
        events.append("execution 1")

    (runner,) = start_all([lambda: queues.execution("s", 1, "e1", first, lambda: 0)])
    time.sleep(0.05)
    queues.execution("s", 2, "e2", lambda: events.append("execution 2"), lambda: 0)
    queues.other("s", lambda: events.append("file"), lambda: 0)
    assert events == []
    release.set()
    runner.join(timeout=5)
    assert events == ["execution 1", "file", "execution 2"]


def test_other_sessions_are_not_held_up() -> None:
    queues = SessionQueues()
    release = threading.Event()
    (busy,) = start_all([lambda: queues.execution("a", 1, "a1", release.wait, lambda: 0)])
    ran: list[str] = []
    queues.execution("b", 1, "b1", lambda: ran.append("b1"), lambda: 0)
    queues.other("b", lambda: ran.append("b-file"), lambda: 0)
    assert ran == ["b1", "b-file"]
    release.set()
    busy.join(timeout=5)


def test_a_missing_predecessor_is_given_up_on() -> None:
    queues = SessionQueues(predecessor_wait_s=0.2)
    queues.start("s")
    ran: list[int] = []
    queues.execution("s", 2, "e2", lambda: ran.append(2), lambda: 0)  # 1 never comes
    assert ran == []
    deadline = time.monotonic() + 3
    while not ran and time.monotonic() < deadline:
        time.sleep(0.02)
    assert ran == [2]
    queues.execution("s", 3, "e3", lambda: ran.append(3), lambda: 0)
    assert ran == [2, 3]  # the order goes on from there


def test_a_late_predecessor_runs_when_it_arrives() -> None:
    queues = SessionQueues(predecessor_wait_s=5)
    queues.start("s")
    ran: list[int] = []
    queues.execution("s", 2, "e2", lambda: ran.append(2), lambda: 0)
    queues.execution("s", 1, "e1", lambda: ran.append(1), lambda: 0)
    assert ran == [1, 2]


def test_a_session_new_to_the_host_starts_where_the_registry_says() -> None:
    queues = SessionQueues()
    ran: list[int] = []
    asked: list[str] = []
    queues.execution("s", 8, "e8", lambda: ran.append(8), lambda: asked.append("s") or 7)
    assert ran == [8] and asked == ["s"]


def test_failing_work_does_not_stop_the_queue() -> None:
    queues = SessionQueues()
    queues.start("s")
    ran: list[int] = []

    def boom() -> None:
        raise RuntimeError("bug")

    queues.execution("s", 1, "e1", boom, lambda: 0)
    queues.execution("s", 2, "e2", lambda: ran.append(2), lambda: 0)
    assert ran == [2]


def test_dropping_a_session_returns_what_waited() -> None:
    queues = SessionQueues()
    queues.start("s")
    release = threading.Event()
    (runner,) = start_all([lambda: queues.execution("s", 1, "e1", release.wait, lambda: 0)])
    time.sleep(0.05)
    ran: list[int] = []
    queues.execution("s", 2, "e2", lambda: ran.append(2), lambda: 0)
    queues.execution("s", 3, "e3", lambda: ran.append(3), lambda: 0)
    assert sorted(queues.drop("s")) == ["e2", "e3"]
    release.set()
    runner.join(timeout=5)
    assert ran == []
