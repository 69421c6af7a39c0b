"""One-shot replies from a host worker to the API request waiting on it, through Redis lists."""

from __future__ import annotations

import json
import secrets
from typing import Any

import redis

from shoal import errors
from shoal.keys import PREFIX

REPLY_TTL_S = 600


def new_key() -> str:
    return f"{PREFIX}:reply:{secrets.token_hex(12)}"


def send(r: redis.Redis, key: str, payload: dict[str, Any]) -> None:
    pipe = r.pipeline()
    pipe.rpush(key, json.dumps(payload))
    pipe.expire(key, REPLY_TTL_S)
    pipe.execute()


def send_error(r: redis.Redis, key: str, exc: errors.ShoalError) -> None:
    send(r, key, {"ok": False, "error": {"code": exc.code, "message": exc.message}})


def wait(r: redis.Redis, key: str, timeout_s: float) -> dict[str, Any]:
    """The reply's payload; a ShoalError when the reply is an error or never comes."""
    item = r.blpop([key], timeout=timeout_s)
    if item is None:
        raise errors.HostTimeout(f"the session's host did not answer within {timeout_s:.0f} s")
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
