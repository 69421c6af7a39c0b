"""File bodies between the API and a session's host, through Redis in bounded chunks.

A transfer is a Redis list of chunks (protocol.FILE_CHUNK bytes each). The producer waits while
the list holds MAX_IN_FLIGHT chunks, so at most ~2 MiB of a transfer is ever in Redis, and
neither the API nor the worker holds a file whole. The last item is END (or ABORT when the
producer gave up). The consumer waits at most CHUNK_TIMEOUT_S for each chunk.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterable, Iterator

import redis

from shoal import keys
from shoal.errors import HostTimeout

MAX_IN_FLIGHT = 8
CHUNK_TIMEOUT_S = 60.0
TRANSFER_TTL_S = 600
END = b"\x00END"
ABORT = b"\x00ABORT"
_FLAG = b"D"  # data items are prefixed so a chunk can never be mistaken for END/ABORT


class TransferAborted(Exception):
    """The producer stopped before the end."""


def new_id() -> str:
    return "xfer_" + secrets.token_hex(12)


def _wait_for_room(
    rb: redis.Redis, key: str, deadline: float, stopped: Callable[[], bool] | None
) -> bool:
    """Wait until the list has room; False when `stopped()` says the consumer gave up."""
    delay = 0.001
    while rb.llen(key) >= MAX_IN_FLIGHT:
        if stopped is not None and stopped():
            return False
        if time.monotonic() > deadline:
            raise HostTimeout("the other side of the file transfer stopped reading")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
    return True


def produce(
    rb: redis.Redis,
    transfer_id: str,
    chunks: Iterable[bytes],
    stopped: Callable[[], bool] | None = None,
) -> int:
    """Push every chunk, then END; return the byte count. On any error push ABORT.

    `stopped` is asked while the consumer lags: when it answers True (say the consumer already
    replied with an error and will read no more) the transfer ends with ABORT at once."""
    key = keys.transfer(transfer_id)
    total = 0
    try:
        for chunk in chunks:
            if not chunk:
                continue
            if not _wait_for_room(rb, key, time.monotonic() + CHUNK_TIMEOUT_S, stopped):
                abort(rb, transfer_id)
                return total
            pipe = rb.pipeline()
            pipe.rpush(key, _FLAG + chunk)
            pipe.expire(key, TRANSFER_TTL_S)
            pipe.execute()
            total += len(chunk)
    except BaseException:
        abort(rb, transfer_id)
        raise
    rb.rpush(key, END)
    rb.expire(key, TRANSFER_TTL_S)
    return total


def abort(rb: redis.Redis, transfer_id: str) -> None:
    key = keys.transfer(transfer_id)
    rb.rpush(key, ABORT)
    rb.expire(key, TRANSFER_TTL_S)


def consume(rb: redis.Redis, transfer_id: str) -> Iterator[bytes]:
    """Yield the chunks until END; TransferAborted on ABORT; HostTimeout if one never comes."""
    key = keys.transfer(transfer_id)
    try:
        while True:
            item = rb.blpop([key], timeout=CHUNK_TIMEOUT_S)
            if item is None:
                raise HostTimeout("the file transfer stalled")
            data = item[1]
            if data == END:
                return
            if data == ABORT:
                raise TransferAborted("the sender aborted the file transfer")
            yield data[1:]
    finally:
        rb.delete(key)
