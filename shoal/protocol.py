"""The host <-> guest agent protocol, shared by both sides.

This one module is imported by the host (workers/agent_client.py) and copied into the guest image
next to the agent at build time, so the two sides can never disagree. Standard library only.
Documented in docs/agent-protocol.md.

A frame is a fixed 12-byte header, a JSON object, then an optional binary blob:

    magic  b"SHL1"          4 bytes
    json_len  uint32 BE     length of the UTF-8 JSON object that follows
    blob_len  uint32 BE     length of the raw bytes after the JSON (file chunks), usually 0

Requests carry {"id": int, "op": str, ...}; each answer repeats the id and carries "ok": true or
"ok": false with "error": {"code", "message"}. Streamed ops (file_get, file_put) exchange
"chunk" frames with the same id; see docs/agent-protocol.md.
"""

from __future__ import annotations

import json
import struct
from typing import Any

PROTOCOL_VERSION = 1
MAGIC = b"SHL1"
HEADER = struct.Struct(">4sII")

# The virtio-serial port name the guest agent listens on.
CHANNEL_NAME = "org.shoal.agent.0"
# Where user files live inside the guest; file paths may be given relative to it or under it.
DATA_DIR = "/mnt/data"

# Limits. The guest is hostile: the host refuses anything larger from it and kills the VM.
MAX_JSON_TO_GUEST = 2 << 20  # code up to 1 MiB plus envelope
MAX_JSON_FROM_GUEST = 32 << 20  # results with base64 images, bounded by MAX_RICH_OUTPUT_BYTES
MAX_BLOB = 1 << 20  # one file chunk
FILE_CHUNK = 256 << 10  # the chunk size both sides send
MAX_CODE_BYTES = 1 << 20
MAX_RICH_OUTPUT_BYTES = 16 << 20  # all display outputs of one execution, base64 included
DEFAULT_MAX_OUTPUT = 4096  # characters of stdout / stderr, as the reference service
MAX_OUTPUT_CAP = 1 << 20

# The agent's interrupt grace: after an interrupt or a timeout it sends SIGINT, and kills the
# interpreter (then starts a fresh one) when the execution has not stopped this long after. The
# guest agent's default (--interrupt-grace), and how long the host client expects it to take.
INTERRUPT_GRACE_S = 3.0

# Operations the agent understands.
OP_HELLO = "hello"
OP_PING = "ping"
OP_EXECUTE = "execute"
OP_INTERRUPT = "interrupt"
OP_RESEED = "reseed"
OP_FILE_PUT = "file_put"
OP_FILE_GET = "file_get"
OP_FILE_LIST = "file_list"
OP_FILE_STAT = "file_stat"
OP_FILE_DELETE = "file_delete"
OP_CHUNK = "chunk"
OP_PREPARE_SNAPSHOT = "prepare_snapshot"  # before a template is saved: sync, drop caches

# Error codes the agent answers with.
E_BAD_FRAME = "bad_frame"
E_UNKNOWN_OP = "unknown_op"
E_INVALID = "invalid_argument"
E_PATH_OUTSIDE = "path_outside_data"
E_NOT_FOUND = "not_found"
E_IS_DIRECTORY = "is_a_directory"
E_NOT_DIRECTORY = "not_a_directory"
E_NO_SPACE = "no_space"
E_BUSY = "busy"
E_NOT_EMPTY = "directory_not_empty"
E_PERMISSION = "permission_denied"
E_NOT_REGULAR = "not_a_regular_file"  # get/put of a link, FIFO, socket or device: never opened
E_CANCELLED = "cancelled"  # a file_get stream ended by an interrupt
E_INTERNAL = "internal"

# Execution outcomes ("status" of an execute answer).
STATUS_OK = "ok"
STATUS_ERROR = "error"  # Python raised, or a shell command exited non-zero
STATUS_TIMED_OUT = "timed_out"
STATUS_INTERRUPTED = "interrupted"


class ProtocolError(Exception):
    """A frame that breaks the protocol: bad magic, over a limit, not a JSON object."""


def encode(message: dict[str, Any], blob: bytes = b"") -> bytes:
    body = json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode()
    return HEADER.pack(MAGIC, len(body), len(blob)) + body + blob


def parse_header(header: bytes, max_json: int, max_blob: int = MAX_BLOB) -> tuple[int, int]:
    """Validate a 12-byte header and return (json_len, blob_len)."""
    if len(header) != HEADER.size:
        raise ProtocolError("short frame header")
    magic, json_len, blob_len = HEADER.unpack(header)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic!r}")
    if json_len > max_json:
        raise ProtocolError(f"JSON of {json_len} bytes is over the {max_json}-byte limit")
    if blob_len > max_blob:
        raise ProtocolError(f"blob of {blob_len} bytes is over the {max_blob}-byte limit")
    return json_len, blob_len


def parse_body(body: bytes) -> dict[str, Any]:
    try:
        message = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"frame body is not JSON: {exc}") from None
    except RecursionError:  # nesting deeper than the decoder's stack allows
        raise ProtocolError("frame body is nested too deeply") from None
    if not isinstance(message, dict):
        raise ProtocolError("frame body is not a JSON object")
    return message


def error_message(request_id: Any, code: str, message: str) -> dict[str, Any]:
    return {"id": request_id, "ok": False, "error": {"code": code, "message": message}}
