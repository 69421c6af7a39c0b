"""A session's executions run one at a time, in arrival order, whatever thread picks them."""

from __future__ import annotations

import random
import threading
import time

from workers.session_slots import SessionSlot


def test_executions_run_in_sequence_order_even_when_threads_start_out_of_order() -> None:
    slot = SessionSlot(last_seq=0)
    ran: list[int] = []
    running = []

    def execution(seq: int) -> None:
        with slot.turn(seq):
            running.append(seq)
            assert len(running) == 1, "two executions of one session overlapped"
            time.sleep(0.002)
            ran.append(seq)
            running.remove(seq)

    order = list(range(1, 21))
    random.Random(7).shuffle(order)
    threads = [threading.Thread(target=execution, args=(seq,)) for seq in order]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert ran == list(range(1, 21))


def test_file_operations_wait_for_a_running_execution() -> None:
    slot = SessionSlot(last_seq=0)
    events: list[str] = []
    started = threading.Event()

    def execution() -> None:
        with slot.turn(1):
            started.set()
            time.sleep(0.05)
            events.append("execution")

    worker = threading.Thread(target=execution)
    worker.start()
    started.wait()
    with slot.turn():
        events.append("file")
    worker.join()
    assert events == ["execution", "file"]
