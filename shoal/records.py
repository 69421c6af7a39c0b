"""The records Shoal keeps in Redis and passes between processes, as types.

They are `TypedDict`s, not classes: each travels as JSON (an execution record rides in its task
and in the done list) or as a Redis hash (a session entry, a batch), and a `TypedDict` names its
fields for the reader and the type checker at no cost on the hot path.
"""

from __future__ import annotations

from typing import Any, NotRequired, TypedDict


class Timings(TypedDict, total=False):
    """Where an execution's time went, stamped by the host worker for scripts/bench's latency
    breakdown; clients never see it."""

    received_at: float  # the host's worker picked the task up
    answered_at: float  # the guest's answer arrived
    guest: dict[str, float] | None  # the agent's own phases, milliseconds (`phases_ms`)


class ExecutionRecord(TypedDict):
    """An execution: created `queued` by the API (shoal/executions.py), advanced by its host."""

    id: str
    session_id: str
    tenant: str
    host: str
    seq: int  # its place in the session's order of executions
    language: str
    code: str
    timeout_s: int
    max_output: int
    status: str  # queued | running | succeeded | failed | timed_out | cancelled | lost
    stdout: str
    stderr: str
    stdout_truncated: bool
    stderr_truncated: bool
    result: dict[str, Any] | None
    result_truncated: NotRequired[bool]  # text cut at max_output, or parts dropped
    outputs: list[dict[str, Any]]  # {type, data, truncated?}
    outputs_truncated: NotRequired[bool]
    output_notes: NotRequired[list[str]]  # what was cut or dropped (protocol.bound_answer)
    error: dict[str, Any] | None  # {name, value, traceback}
    exit_code: int | None
    interpreter_restarted: bool
    created_at: float
    started_at: float | None
    finished_at: float | None
    duration_ms: float | None
    cancel_requested: bool
    callback_url: NotRequired[str | None]
    timings: NotRequired[Timings]


class SessionEntry(TypedDict):
    """A session's registry hash (shoal/sessions.py); Redis hashes hold strings only."""

    id: str
    tenant: str
    pool: str
    host: str
    state: str  # creating | active | lost | expired | deleted
    identifier: str  # the dynamic-sessions identifier, "" for a /v1 session
    created_at: str  # epoch seconds
    last_used_at: str  # epoch seconds
    cooldown_s: str
    reason: str  # why it was lost
    vm: NotRequired[str]  # the id of its VM on its host, once it has one
    warm: NotRequired[str]  # "1" when its VM came from the ready pool
    done_seq: NotRequired[str]  # the seq of its last finished execution
    forked_from: NotRequired[str]  # the session it is a fork of


class PoolCounts(TypedDict):
    ready: int
    starting: int
    busy: int


class Heartbeat(TypedDict):
    """What a host worker publishes every SHOAL_HEARTBEAT_S (workers/host.py)."""

    host: str
    at: float
    started_at: float
    sessions: int
    vms: int
    max_vms: int
    template: str  # building | ready | failed: <why>
    pools: dict[str, PoolCounts]
    pool_errors: dict[str, str]
    driver: dict[str, Any]  # the VM driver's own status (libvirt, accelerator, cgroups)
    memory: dict[str, int]  # available_mib, total_mib, reserve_mib (shoal/host_memory.py)


class BatchMeta(TypedDict):
    """A batch's registry hash (shoal/batches.py); Redis hashes hold strings only."""

    id: str
    tenant: str
    pool: str
    status: str  # running | completed | cancelled
    max_parallel: str
    callback_url: str
    created_at: str
    started_at: str
    finished_at: str
    total: str
    from_session: NotRequired[str]  # items run in forks of this session


class BatchItem(TypedDict, total=False):
    """One item's progress; its spec (code, files, ...) is stored apart."""

    index: int
    status: str  # pending | running | invalid | error | an execution status
    error: str | None
    execution_id: str
    own_session: str  # the session made for this item alone
    execution: dict[str, Any]  # the /v1 execution object once it ended
    files: dict[str, str]  # collected files: path -> base64
    files_truncated: bool  # some matching files were left out (the collect limits)
