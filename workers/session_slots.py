"""Per-session turn-taking inside a host's worker process.

Executions of one session run one at a time, in arrival order: the API numbers them (`seq`),
and each waits here for its predecessor. Celery's threads may pick two of a session's tasks at
once; the slot, not the queue, decides who goes first.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

# How long an execution waits for a predecessor that never shows up (its task expired, or
# the API died between numbering and sending it) before it runs anyway.
PREDECESSOR_WAIT_S = 30.0


class SessionSlot:
    def __init__(self, last_seq: int) -> None:
        self.cond = threading.Condition()
        self.last_seq = last_seq
        self.busy = False
        self.running_execution: str | None = None

    @contextmanager
    def turn(self, seq: int | None = None, execution_id: str | None = None) -> Iterator[None]:
        """Hold the session: for an execution (`seq` given) wait for its turn; for a file
        operation only wait until the session is not busy."""
        deadline = time.monotonic() + PREDECESSOR_WAIT_S
        with self.cond:
            while self.busy or (seq is not None and self.last_seq < seq - 1):
                remaining = deadline - time.monotonic()
                if remaining <= 0 and not self.busy:
                    break
                self.cond.wait(timeout=max(remaining, 0.5))
            self.busy = True
            self.running_execution = execution_id
        try:
            yield
        finally:
            with self.cond:
                self.busy = False
                self.running_execution = None
                if seq is not None:
                    self.last_seq = max(self.last_seq, seq)
                self.cond.notify_all()


class SlotTable:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._slots: dict[str, SessionSlot] = {}

    def get(self, session_id: str, last_seq: Callable[[], int] = lambda: 0) -> SessionSlot:
        """The session's slot; a new one starts after `last_seq()` (asked only then)."""
        with self._lock:
            slot = self._slots.get(session_id)
        if slot is not None:
            return slot
        initial = last_seq()
        with self._lock:
            return self._slots.setdefault(session_id, SessionSlot(initial))

    def drop(self, session_id: str) -> None:
        with self._lock:
            self._slots.pop(session_id, None)
