"""A host's ready VMs: restored ahead of demand per pool, taken atomically by new sessions.

Lives in the host's worker process, the one owner of the host's VMs. `take` hands a ready VM to
exactly one session (under a lock; a VM id leaves the ready list before anyone sees it);
`replenish` starts the restores each pool is due (pool/sizing.py decides how many) with at most
`max_parallel` at a time (our hosts have 2 cores), and a pool whose restores fail backs off
exponentially instead of looping hot; `let_go` hands back ready VMs a host no longer keeps.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from shoal.pools import Pool

log = logging.getLogger("shoal.pool")

BACKOFF_FIRST_S = 2.0
BACKOFF_MAX_S = 120.0


def new_vm_id() -> str:
    return "vm_" + secrets.token_hex(10)


@dataclass
class _PoolState:
    ready: list[str]
    starting: int = 0
    failures: int = 0
    retry_at: float = 0.0
    last_error: str = ""


class ReadyVMs:
    def __init__(
        self,
        start_vm: Callable[[str, Pool], None],
        max_parallel: int = 2,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        """`start_vm(vm_id, pool)` restores (or boots) one VM and returns when its agent answers;
        `on_ready()` is called after each VM joins its pool (the host tells placement)."""
        self._start_vm = start_vm
        self._on_ready = on_ready
        self._lock = threading.Lock()
        self._pools: dict[str, _PoolState] = {}
        self._slots = threading.BoundedSemaphore(max_parallel)

    def _state(self, name: str) -> _PoolState:
        return self._pools.setdefault(name, _PoolState(ready=[]))

    def take(self, pool_name: str) -> str | None:
        """A ready VM's id, now owned by the caller alone; None when the pool has none."""
        with self._lock:
            ready = self._state(pool_name).ready
            return ready.pop(0) if ready else None

    def ids(self) -> set[str]:
        with self._lock:
            return {vm_id for state in self._pools.values() for vm_id in state.ready}

    def counts(self) -> dict[str, dict]:
        with self._lock:
            return {
                name: {
                    "ready": len(s.ready),
                    "starting": s.starting,
                    "failures": s.failures,
                    "last_error": s.last_error,
                }
                for name, s in self._pools.items()
            }

    def held(self) -> dict[str, int]:
        """Ready and starting VMs per pool."""
        with self._lock:
            return {name: len(s.ready) + s.starting for name, s in self._pools.items()}

    def let_go(self, pool_name: str, count: int) -> list[str]:
        """Up to `count` of the pool's ready VMs, the newest first, now the caller's to destroy."""
        with self._lock:
            ready = self._state(pool_name).ready
            taken = ready[len(ready) - min(count, len(ready)) :]
            del ready[len(ready) - len(taken) :]
            return taken[::-1]

    def replenish(self, goals: Iterable[tuple[Pool, int]]) -> int:
        """Start restores until each (pool, goal) holds `goal` ready or starting VMs, unless the
        pool is backing off; return how many were started."""
        started = 0
        now = time.monotonic()
        for pool, goal in goals:
            with self._lock:
                state = self._state(pool.name)
                missing = goal - len(state.ready) - state.starting
                if missing <= 0 or now < state.retry_at:
                    continue
                state.starting += missing
            for _ in range(missing):
                threading.Thread(
                    target=self._fill_one, args=(pool,), name=f"replenish-{pool.name}", daemon=True
                ).start()
                started += 1
        return started

    def _fill_one(self, pool: Pool) -> None:
        vm_id = new_vm_id()
        try:
            with self._slots:
                self._start_vm(vm_id, pool)
        except Exception as exc:
            with self._lock:
                state = self._state(pool.name)
                state.starting -= 1
                state.failures += 1
                delay = min(BACKOFF_FIRST_S * 2 ** (state.failures - 1), BACKOFF_MAX_S)
                state.retry_at = time.monotonic() + delay
                state.last_error = str(exc)
            log.error(
                "pool=%s restoring a ready VM failed (retry in %.0f s): %s", pool.name, delay, exc
            )
            return
        with self._lock:
            state = self._state(pool.name)
            state.starting -= 1
            state.failures = 0
            state.last_error = ""
            state.ready.append(vm_id)
        log.info("pool=%s vm=%s ready", pool.name, vm_id)
        if self._on_ready is not None:
            try:
                self._on_ready()
            except Exception:
                log.exception("pool=%s announcing a ready VM failed", pool.name)
