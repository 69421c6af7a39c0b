"""The framing of the messages between the agent and its interpreter process, for both sides.

The agent (kernel_process.py) and the interpreter (shoal_kernel.py) talk over a private socket;
both import this module, so the framing is written once. A message is a 4-byte big-endian length,
then that many bytes of one UTF-8 JSON object. Each side passes the longest message it accepts
from the other: the interpreter runs user code, so the agent treats what it reads as untrusted,
and a length over the limit or a body that is not a JSON object (nested too deeply included)
breaks the framing.

Standard library only and nothing else of the agent's: the interpreter imports it before it
takes the agent's directory off sys.path, and it stays in the user's sys.modules (hence the
shoal_ prefix, like shoal_kernel and shoal_mpl_backend).
"""

from __future__ import annotations

import json
import struct

LENGTH = struct.Struct(">I")


def json_utf8(message: dict, **dumps_options) -> bytes:
    """Compact JSON as UTF-8. A lone surrogate (user code can make one: '\\udc80') cannot be
    UTF-8 and becomes '?': the frame stays valid for the reader, and the writer never raises."""
    text = json.dumps(message, separators=(",", ":"), ensure_ascii=False, **dumps_options)
    return text.encode("utf-8", "replace")


def encode_message(message: dict) -> bytes:
    """One framed message: compact JSON, UTF-8."""
    body = json_utf8(message)
    return LENGTH.pack(len(body)) + body


def frame(body: bytes) -> bytes:
    """One framed message around a JSON object already encoded."""
    return LENGTH.pack(len(body)) + body


def take_messages(buf: bytearray, limit: int) -> list[dict] | None:
    """The complete messages at the start of buf, removed from it (a partial one stays); None
    when the framing is broken: a length over limit, or a body that is not a JSON object."""
    out = []
    size = LENGTH.size
    while len(buf) >= size:
        (length,) = LENGTH.unpack_from(buf)
        if length > limit:
            return None
        end = size + length
        if len(buf) < end:
            break
        body = buf[size:end]
        del buf[:end]
        try:
            message = json.loads(body)
        except (ValueError, RecursionError):  # bad UTF-8 or JSON; nesting too deep to decode
            return None
        if not isinstance(message, dict):
            return None
        out.append(message)
    return out
