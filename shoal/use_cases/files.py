"""A session's files in /mnt/data: list, stat and delete them, stream them in and out.

Bytes move through Redis in chunks (shoal/transfers.py) between the API and the session's host,
which moves them over the agent's channel; the host never opens a path the guest controls.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from shoal import queue, replies, sessions, transfers
from shoal.context import Context
from shoal.errors import SessionLost
from shoal.records import SessionEntry

# How long a request waits for the session's host to answer a file operation.
FILE_OP_TIMEOUT_S = 60


def _check_usable(entry: SessionEntry) -> None:
    if entry["state"] == sessions.LOST:
        raise SessionLost(f"session {entry['id']} was lost ({entry.get('reason')})")


def file_op(c: Context, entry: SessionEntry, op: str, **args: object) -> dict:
    """list / stat / delete, answered by the session's host."""
    _check_usable(entry)
    reply_key = replies.new_key()
    queue.FILE_OP.send(
        c.celery,
        host=entry["host"],
        session_id=entry["id"],
        op=op,
        args=args,
        reply_key=reply_key,
        pool_name=entry["pool"],
    )
    return replies.wait(c.redis, reply_key, FILE_OP_TIMEOUT_S)


def _start_transfer(c: Context, entry: SessionEntry, task: queue.Task, path: str) -> tuple:
    _check_usable(entry)
    transfer_id = transfers.new_id()
    reply_key = replies.new_key()
    task.send(
        c.celery,
        host=entry["host"],
        session_id=entry["id"],
        transfer_id=transfer_id,
        path=path,
        reply_key=reply_key,
        pool_name=entry["pool"],
    )
    return transfer_id, reply_key


def upload_file(c: Context, entry: SessionEntry, path: str, chunks: Iterable[bytes]) -> dict:
    """Stream `chunks` into the session's file `path`; return the guest's stat of it."""
    transfer_id, reply_key = _start_transfer(c, entry, queue.PUT_FILE, path)
    # The host replies before the end only with an error (busy, a refused path): stop sending.
    transfers.produce(c.redis_bin, transfer_id, chunks, lambda: bool(c.redis.exists(reply_key)))
    return replies.wait(c.redis, reply_key, FILE_OP_TIMEOUT_S)["file"]


def download_file(c: Context, entry: SessionEntry, path: str) -> tuple[dict, Iterator[bytes]]:
    """The file's stat and an iterator over its bytes, streamed from the guest."""
    transfer_id, reply_key = _start_transfer(c, entry, queue.GET_FILE, path)
    info = replies.wait(c.redis, reply_key, FILE_OP_TIMEOUT_S)["file"]
    return info, transfers.consume(c.redis_bin, transfer_id)
