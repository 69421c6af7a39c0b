"""One-shot replies from a host worker to the API request waiting on it, through Redis lists."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from typing import Any

import redis

from shoal import errors
from shoal.keys import PREFIX

REPLY_TTL_S = 600
CHECK_EVERY_S = 5.0


def new_key() -> str:
    return f"{PREFIX}:reply:{secrets.token_hex(12)}"


def send(r: redis.Redis, key: str, payload: dict[str, Any]) -> None:
    pipe = r.pipeline()
    pipe.rpush(key, json.dumps(payload))
    pipe.expire(key, REPLY_TTL_S)
    pipe.execute()


def send_error(r: redis.Redis, key: str, exc: errors.ShoalError) -> None:
    send(r, key, {"ok": False, "error": {"code": exc.code, "message": exc.message}})


def wait(
    r: redis.Redis, key: str, timeout_s: float, check: Callable[[], None] | None = None
) -> dict[str, Any]:
    """The reply's payload; a ShoalError when the reply is an error or never comes.

    `check` (optional) is called every CHECK_EVERY_S of waiting and raises to give up early
    (say the host that should answer has died)."""
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise errors.HostTimeout(f"the session's host did not answer within {timeout_s:.0f} s")
        block = min(remaining, CHECK_EVERY_S) if check is not None else remaining
        item = r.blpop([key], timeout=max(block, 0.01))  # under 1 ms BLPOP would block for ever
        if item is not None:
            break
        if check is not None:
            check()
    payload = json.loads(item[1])
    if not payload.get("ok", True):
        raise error_from(payload["error"])
    return payload


def error_from(error: dict[str, str]) -> errors.ShoalError:
    """Rebuild the ShoalError a worker sent, by its code."""
    for cls in _all_error_classes():
        if cls.code == error.get("code"):
            return cls(error.get("message", ""))
    return errors.ShoalError(error.get("message", "internal error"))


def _all_error_classes() -> list[type[errors.ShoalError]]:
    found, stack = [], [errors.ShoalError]
    while stack:
        cls = stack.pop()
        found.append(cls)
        stack.extend(cls.__subclasses__())
    return found
