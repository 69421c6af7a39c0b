"""Each session's work on this host, one piece at a time, without a thread parked per waiter.

Executions of a session run one at a time, in the order the API numbered them (`seq`); file
operations run at the session's next free moment. A task whose session is busy, or whose
predecessor has not arrived yet, does not wait: its work is queued here and the task's thread
returns to the worker at once. Whichever thread is running the session's current work runs the
next piece when it is done, so the worker's threads are only ever taken by work that runs (at
most one per session).

A predecessor that never arrives (its task expired, or the API died between numbering and
sending it) is given up on after PREDECESSOR_WAIT_S: a timer's thread then runs what waits.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("shoal.host")

# How long an execution waits for a predecessor that never shows up before it runs anyway.
PREDECESSOR_WAIT_S = 30.0

Work = Callable[[], None]


@dataclass
class _Session:
    last_seq: int  # the last execution that ran (or was given up on)
    busy: bool = False  # a thread is running this session's work
    running_execution: str | None = None
    executions: dict[int, tuple[str, Work]] = field(default_factory=dict)  # seq -> (id, work)
    others: deque[Work] = field(default_factory=deque)  # file operations, first come first run
    overdue: bool = False  # the missing predecessor was waited for long enough
    timer: threading.Timer | None = None


class SessionQueues:
    """The work queued per session on this host, and who runs it."""

    def __init__(self, predecessor_wait_s: float = PREDECESSOR_WAIT_S) -> None:
        self.predecessor_wait_s = predecessor_wait_s
        self._lock = threading.Lock()
        self._sessions: dict[str, _Session] = {}

    def start(self, session_id: str, last_seq: int = 0) -> None:
        """Know a new session (its first execution will be seq last_seq + 1)."""
        with self._lock:
            self._sessions.setdefault(session_id, _Session(last_seq))

    def execution(
        self, session_id: str, seq: int, execution_id: str, work: Work, last_seq: Callable[[], int]
    ) -> None:
        """Run `work` in its turn: in this thread when the session is free and it is next,
        otherwise later, in the thread that runs the session's work then. `last_seq()` says
        where a session this host has not seen yet stands (asked only then)."""
        s = self._session(session_id, last_seq)
        with self._lock:
            s.executions[seq] = (execution_id, work)
            if s.busy:
                return
            s.busy = True
        self._drain(s)

    def other(self, session_id: str, work: Work, last_seq: Callable[[], int]) -> None:
        """Run `work` (a file operation) when the session is next free, before any execution
        that waits."""
        s = self._session(session_id, last_seq)
        with self._lock:
            s.others.append(work)
            if s.busy:
                return
            s.busy = True
        self._drain(s)

    def running_execution(self, session_id: str) -> str | None:
        with self._lock:
            s = self._sessions.get(session_id)
            return s.running_execution if s else None

    def drop(self, session_id: str) -> list[str]:
        """Forget the session; the ids of the executions that were still waiting (they will
        never run: the caller ends them)."""
        with self._lock:
            s = self._sessions.pop(session_id, None)
            if s is None:
                return []
            if s.timer is not None:
                s.timer.cancel()
            waiting = [execution_id for execution_id, _work in s.executions.values()]
            s.executions.clear()
            s.others.clear()
            return waiting

    def waiting(self, session_id: str) -> int:
        """How many pieces of work wait for the session (for tests and the heartbeat)."""
        with self._lock:
            s = self._sessions.get(session_id)
            return len(s.executions) + len(s.others) if s else 0

    # --- running -----------------------------------------------------------------------------
    def _session(self, session_id: str, last_seq: Callable[[], int]) -> _Session:
        with self._lock:
            s = self._sessions.get(session_id)
        if s is not None:
            return s
        initial = last_seq()  # may ask Redis: not under the lock
        with self._lock:
            return self._sessions.setdefault(session_id, _Session(initial))

    def _drain(self, s: _Session) -> None:
        """Run the session's work until none is ready; this thread holds the session."""
        while True:
            with self._lock:
                taken = self._take(s)
                if taken is None:
                    s.busy = False
                    self._arm_timer(s)
                    return
            seq, work = taken
            try:
                work()
            except Exception:  # the work ends its own records; this only keeps the queue going
                log.exception("work of a session failed")
            finally:
                with self._lock:
                    s.running_execution = None
                    if seq is not None:
                        s.last_seq = max(s.last_seq, seq)

    def _take(self, s: _Session) -> tuple[int | None, Work] | None:
        """The next piece of work that may run now (under the lock)."""
        if s.others:
            return None, s.others.popleft()
        if not s.executions:
            return None
        seq = min(s.executions)
        if seq > s.last_seq + 1 and not s.overdue:
            return None  # its predecessor has not arrived yet
        s.overdue = False
        execution_id, work = s.executions.pop(seq)
        s.running_execution = execution_id
        return seq, work

    def _arm_timer(self, s: _Session) -> None:
        """When executions wait for a missing predecessor, give up on it after a while."""
        if s.executions and s.timer is None:
            s.timer = threading.Timer(self.predecessor_wait_s, self._give_up_waiting, (s,))
            s.timer.daemon = True
            s.timer.start()

    def _give_up_waiting(self, s: _Session) -> None:
        with self._lock:
            s.timer = None
            if not s.executions or min(s.executions) <= s.last_seq + 1:
                return  # the predecessor came meanwhile
            log.warning("an execution's predecessor never arrived; running the next one")
            s.overdue = True
            if s.busy:
                return
            s.busy = True
        self._drain(s)
