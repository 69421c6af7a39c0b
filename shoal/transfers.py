"""File bodies between the API and a session's host, through Redis in bounded chunks.

A transfer is a Redis list of chunks (protocol.FILE_CHUNK bytes each). The producer waits while
the list holds MAX_IN_FLIGHT chunks, so at most ~2 MiB of a transfer is ever in Redis, and
neither the API nor the worker holds a file whole.

Either side learns at once when the other stops:
- The last item is END, or ABORT (followed by a short reason) when the producer failed: the
  consumer raises TransferAborted as soon as it reads it, never waiting for a chunk that will not
  come.
- A consumer that stops before the end (its client left, the guest refused the bytes) sets the
  transfer's cancel key; the producer reads it in the same round trip as every chunk it pushes,
  and while it waits for room, and stops.

The consumer waits at most CHUNK_TIMEOUT_S for each chunk; given a `check`, it calls it every
CHECK_EVERY_S of waiting, so a host that died (no ABORT will ever come) is noticed sooner.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Callable, Iterable, Iterator

import redis

from shoal import keys
from shoal.errors import HostTimeout

MAX_IN_FLIGHT = 8
CHUNK_TIMEOUT_S = 60.0
CHECK_EVERY_S = 5.0
TRANSFER_TTL_S = 600
END = b"\x00END"
ABORT = b"\x00ABORT"
MAX_REASON_BYTES = 200
_FLAG = b"D"  # data items are prefixed so a chunk can never be mistaken for END/ABORT
_MIN_BLOCK_S = 0.01  # BLPOP reads a timeout under 1 ms as 0, which blocks for ever


class TransferAborted(Exception):
    """The producer stopped before the end."""


def new_id() -> str:
    return "xfer_" + secrets.token_hex(12)


def _cancelled(rb: redis.Redis, transfer_id: str) -> bool:
    return bool(rb.exists(keys.transfer_cancel(transfer_id)))


def _wait_for_room(
    rb: redis.Redis, transfer_id: str, deadline: float, stopped: Callable[[], bool] | None
) -> bool:
    """Wait until the list has room; False when the consumer gave up (its cancel key, or
    `stopped()` says so)."""
    key = keys.transfer(transfer_id)
    delay = 0.001
    while rb.llen(key) >= MAX_IN_FLIGHT:
        if _cancelled(rb, transfer_id) or (stopped is not None and stopped()):
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
    """Push every chunk, then END; return the byte count. On any error push ABORT and re-raise.

    The producer stops early, without an error, when the consumer set the cancel key, or when
    `stopped` (asked while the consumer lags) answers True, say because the consumer already
    replied with an error and will read no more; that ends the transfer with ABORT."""
    key = keys.transfer(transfer_id)
    cancel_key = keys.transfer_cancel(transfer_id)
    total = 0
    try:
        for chunk in chunks:
            if not chunk:
                continue
            if not _wait_for_room(rb, transfer_id, time.monotonic() + CHUNK_TIMEOUT_S, stopped):
                abort(rb, transfer_id)
                return total
            pipe = rb.pipeline()
            pipe.rpush(key, _FLAG + chunk)
            pipe.expire(key, TRANSFER_TTL_S)
            pipe.exists(cancel_key)
            if pipe.execute()[2]:
                rb.delete(key)  # the consumer has gone: nobody will read what is left
                return total
            total += len(chunk)
    except BaseException as exc:
        abort(rb, transfer_id, f"the sender failed ({type(exc).__name__})")
        raise
    pipe = rb.pipeline()
    pipe.rpush(key, END)
    pipe.expire(key, TRANSFER_TTL_S)
    pipe.execute()
    return total


def abort(rb: redis.Redis, transfer_id: str, reason: str = "") -> None:
    """End the transfer with ABORT (and why); best effort: it runs on failure paths, where the
    error that got us here is the one to report."""
    key = keys.transfer(transfer_id)
    item = ABORT + reason.encode()[:MAX_REASON_BYTES]
    with contextlib.suppress(redis.RedisError):
        pipe = rb.pipeline()
        pipe.rpush(key, item)
        pipe.expire(key, TRANSFER_TTL_S)
        pipe.execute()


def cancel(rb: redis.Redis, transfer_id: str) -> None:
    """Tell the producer to stop: the consumer will read no more. Best effort, as abort()."""
    with contextlib.suppress(redis.RedisError):
        pipe = rb.pipeline()
        pipe.set(keys.transfer_cancel(transfer_id), b"1", ex=TRANSFER_TTL_S)
        pipe.delete(keys.transfer(transfer_id))
        pipe.execute()


def consume(
    rb: redis.Redis, transfer_id: str, check: Callable[[], None] | None = None
) -> Iterator[bytes]:
    """Yield the chunks until END; TransferAborted on ABORT; HostTimeout if one never comes.

    `check` (optional) is called every CHECK_EVERY_S while a chunk is awaited and raises to
    give up (say the producer's host has died). Stopped before END or ABORT (closed early, or
    an error), the consumer cancels the transfer so the producer stops at once."""
    key = keys.transfer(transfer_id)
    finished = False
    try:
        deadline = time.monotonic() + CHUNK_TIMEOUT_S
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise HostTimeout("the file transfer stalled")
            block = min(remaining, CHECK_EVERY_S) if check is not None else remaining
            item = rb.blpop([key], timeout=max(block, _MIN_BLOCK_S))
            if item is None:
                if check is not None:
                    check()
                continue
            data = item[1]
            if data == END:
                finished = True
                return
            if data.startswith(ABORT):
                finished = True
                reason = data[len(ABORT) :].decode("utf-8", "replace")
                raise TransferAborted(reason or "the sender aborted the file transfer")
            deadline = time.monotonic() + CHUNK_TIMEOUT_S
            yield data[1:]
    finally:
        if finished:
            with contextlib.suppress(redis.RedisError):
                rb.delete(key)
        else:
            cancel(rb, transfer_id)
