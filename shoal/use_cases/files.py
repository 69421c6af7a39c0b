"""A session's files in /mnt/data: list, stat and delete them, stream them in and out.

Bytes move through Redis in chunks (shoal/transfers.py) between the API and the session's host,
which moves them over the agent's channel; the host never opens a path the guest controls.

A download is refused before its status line when the path is not a regular file: the host asks
the agent to open the file first and replies with the entry of what is open, or the refusal.
Whatever fails after that reaches the waiting request at once (the transfer's ABORT, or a dead
host noticed on its heartbeat): the body then ends short of its Content-Length, which is all a
client can still be told, and the API logs why.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Iterator

from shoal import liveness, queue, replies, transfers
from shoal.context import Context
from shoal.errors import SessionLost, ShoalError
from shoal.hosts import live_hosts
from shoal.records import SessionEntry
from shoal.use_cases.sessions import check_reachable

log = logging.getLogger("shoal.files")

# How long a request waits for the session's host to answer a file operation.
FILE_OP_TIMEOUT_S = 60
# How often a request waiting on the host checks that the host is still alive.
LIVENESS_POLL_S = 5.0


class _HostCheck:
    """Raises SessionLost once the session's host has stopped answering (its heartbeat expired);
    asks Redis at most every LIVENESS_POLL_S."""

    def __init__(self, c: Context, entry: SessionEntry) -> None:
        self.c = c
        self.host = entry["host"]
        self.next_at = time.monotonic() + LIVENESS_POLL_S

    def __call__(self) -> None:
        now = time.monotonic()
        if now < self.next_at:
            return
        self.next_at = now + LIVENESS_POLL_S
        if self.host in live_hosts(self.c.redis):
            return
        liveness.check_hosts(self.c.redis, self.c.settings.execution_ttl_s)
        raise SessionLost(f"the session's host {self.host} stopped answering")


def file_op(c: Context, entry: SessionEntry, op: str, **args: object) -> dict:
    """list / stat / delete, answered by the session's host."""
    reply_key = _ask_host(c, entry, queue.FILE_OP, op=op, args=args)
    return replies.wait(c.redis, reply_key, FILE_OP_TIMEOUT_S, _HostCheck(c, entry))


def _start_transfer(c: Context, entry: SessionEntry, task: queue.Task, path: str) -> tuple:
    transfer_id = transfers.new_id()
    return transfer_id, _ask_host(c, entry, task, transfer_id=transfer_id, path=path)


def _ask_host(c: Context, entry: SessionEntry, task: queue.Task, **args: object) -> str:
    """Send a task about the session to its host, with a fresh reply key; return the key."""
    check_reachable(c, entry)
    reply_key = replies.new_key()
    task.send(
        c.celery,
        host=entry["host"],
        session_id=entry["id"],
        reply_key=reply_key,
        pool_name=entry["pool"],
        **args,
    )
    return reply_key


def upload_file(c: Context, entry: SessionEntry, path: str, chunks: Iterable[bytes]) -> dict:
    """Stream `chunks` into the session's file `path`; return the guest's stat of it.

    The host replies before the end only with an error (busy, a refused path, a failed write),
    and cancels the transfer as it does: sending stops at the next chunk and the error is
    answered. A host that dies is noticed on its heartbeat."""
    transfer_id, reply_key = _start_transfer(c, entry, queue.PUT_FILE, path)
    check = _HostCheck(c, entry)

    def stopped() -> bool:
        check()
        return bool(c.redis.exists(reply_key))

    transfers.produce(c.redis_bin, transfer_id, chunks, stopped)
    return replies.wait(c.redis, reply_key, FILE_OP_TIMEOUT_S, check)["file"]


def download_file(c: Context, entry: SessionEntry, path: str) -> tuple[dict, Iterator[bytes]]:
    """The file's stat and an iterator over its bytes, streamed from the guest.

    A path that is not a regular file (a directory, a symbolic link, a FIFO, a socket, a device)
    raises here, before any byte moves."""
    transfer_id, reply_key = _start_transfer(c, entry, queue.GET_FILE, path)
    check = _HostCheck(c, entry)
    try:
        info = replies.wait(c.redis, reply_key, FILE_OP_TIMEOUT_S, check)["file"]
    except BaseException:
        transfers.cancel(c.redis_bin, transfer_id)  # nobody will read it: the host stops
        raise
    return info, _body(c, entry, transfer_id, info, check)


def _body(
    c: Context, entry: SessionEntry, transfer_id: str, info: dict, check: _HostCheck
) -> Iterator[bytes]:
    """Exactly the `size` bytes the entry announced (the response's Content-Length).

    A transfer that fails, or a file that shrank while it was read, raises after logging why:
    the status line has gone, so the server can only cut the body short, which a client sees.
    Bytes past `size` (the file grew) are not sent."""
    size = int(info["size"])
    sent = 0
    try:
        with contextlib.closing(transfers.consume(c.redis_bin, transfer_id, check)) as chunks:
            for chunk in chunks:
                if len(chunk) > size - sent:  # the file grew: send what was announced, stop
                    tail = chunk[: size - sent]
                    sent += len(tail)
                    if tail:
                        yield tail
                    return  # closing the transfer cancels it: the host stops reading
                sent += len(chunk)
                yield chunk
        if sent < size:
            raise transfers.TransferAborted("the file shrank while it was read")
    except (transfers.TransferAborted, ShoalError) as exc:
        log.warning(
            "session=%s host=%s transfer=%s download of %r ended after %d of %d bytes: %s",
            entry["id"], entry["host"], transfer_id, info.get("path"), sent, size, exc,
        )  # fmt: skip
        raise
