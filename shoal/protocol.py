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

import base64
import json
import re
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
MAX_JSON_FROM_GUEST = 32 << 20  # an execute answer: images within its rich-output budget
MAX_BLOB = 1 << 20  # one file chunk
FILE_CHUNK = 256 << 10  # the chunk size both sides send
# The transfer disk (workers/transfer_disk.py): host-to-guest upload bytes over a read-only
# virtio-blk disk, a ring of TRANSFER_SLOTS segments; the guest finds it by its serial.
TRANSFER_DISK_SERIAL = "shoal-transfer"
TRANSFER_SEGMENT = 4 << 20  # the most one disk chunk names; each slot of the ring holds one
TRANSFER_SLOTS = 8
TRANSFER_DISK_BYTES = TRANSFER_SEGMENT * TRANSFER_SLOTS
TRANSFER_BLOCK = 512  # disk chunk offsets are multiples of this (the guest reads with O_DIRECT)
MAX_CODE_BYTES = 1 << 20
DEFAULT_MAX_OUTPUT = 4096  # characters of stdout / stderr / each text part, as the reference
MAX_OUTPUT_CAP = 1 << 20

# The rich-output budget of one execution (the execute request's max_rich_output_bytes): the
# result and every display output share it. Images count their decoded bytes, text and JSON
# their characters, and each display output OUTPUT_COST more (its envelope), so a flood of tiny
# displays is bounded too. See bound_answer() below and docs/limits.md ("Outputs").
DEFAULT_RICH_OUTPUT_BYTES = 4 << 20
MAX_RICH_OUTPUT_BYTES = 16 << 20  # the largest budget a request may ask for
OUTPUT_COST = 64
# MIME types an answer carries. Text parts are cut at max_output characters; images are kept
# whole or dropped (a cut PNG is garbage), and so is application/json (a cut document does not
# parse), kept when its JSON text is within max_output characters.
RICH_MIMES = (
    "text/plain",
    "text/html",
    "text/markdown",
    "text/latex",
    "application/json",
    "image/png",
    "image/jpeg",
    "image/svg+xml",
)
TEXT_MIMES = frozenset(RICH_MIMES[:4])
BASE64_MIMES = frozenset({"image/png", "image/jpeg"})
JSON_MIME = "application/json"
SVG_MIME = "image/svg+xml"
# What was cut or dropped is said in output_notes: at most MAX_NOTES lines (the last one says
# when there were more), each at most MAX_NOTE_CHARS.
MAX_NOTES = 16
MAX_NOTE_CHARS = 300
MORE_NOTES = "more parts were cut or dropped than these notes show; `truncated` marks them"
# An error's fields; longer ones keep head and tail (clip()).
MAX_ERROR_NAME = 256
MAX_ERROR_VALUE = 16 << 10
MAX_TRACEBACK = 256 << 10
CLIP_MARK = "\n... [truncated] ...\n"

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


# application/json data nested deeper than this is dropped: every layer that handles it again
# (the host's record, the API's response, a client's parser) must not run out of stack.
MAX_JSON_DEPTH = 100
# In the raw JSON text of a frame: a \\u escape of a UTF-16 surrogate that is not itself
# escaped (an even number of backslashes before it). Only a decoded lone one is refused.
_SURROGATE_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*\\u[dD][89a-fA-F]")


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


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_body(body: bytes) -> dict[str, Any]:
    """A frame's JSON object. Strict: UTF-8 only (json.loads would guess UTF-16 or -32), no
    NaN or Infinity (not JSON: a client's parser would choke on them later), no lone UTF-16
    surrogate (no UTF-8 encoder takes one), nesting no deeper than the decoder's stack."""
    try:
        message = json.loads(body.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"frame body is not JSON: {exc}") from None
    except RecursionError:  # nesting deeper than the decoder's stack allows
        raise ProtocolError("frame body is nested too deeply") from None
    if not isinstance(message, dict):
        raise ProtocolError("frame body is not a JSON object")
    if b"\\u" in body and _SURROGATE_ESCAPE.search(body) and not _encodable(message):
        raise ProtocolError("frame body holds a lone UTF-16 surrogate")
    return message


def _encodable(message: dict[str, Any]) -> bool:
    try:
        json.dumps(message, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def json_depth(value: Any) -> int:
    """How deeply lists and dicts nest in `value` (0 for a scalar), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return deepest


def error_message(request_id: Any, code: str, message: str) -> dict[str, Any]:
    return {"id": request_id, "ok": False, "error": {"code": code, "message": message}}


# --- output bounds: applied by the interpreter as it collects, by the agent to what the
# interpreter says, and by the host to what the agent says (it trusts no flag of the guest's) --
def add_note(notes: list[str], text: str) -> None:
    """Append a note unless MAX_NOTES are there (the last one then says there were more)."""
    if len(notes) < MAX_NOTES - 1:
        notes.append(text[:MAX_NOTE_CHARS])
    elif len(notes) == MAX_NOTES - 1:
        notes.append(MORE_NOTES)


def clip(text: str, limit: int) -> str:
    """At most `limit` characters: head and tail around CLIP_MARK when longer."""
    if len(text) <= limit:
        return text
    half = max(limit - len(CLIP_MARK), 0) // 2
    return text[:half] + CLIP_MARK + text[len(text) - half :] if half else text[:limit]


def base64_size(text: str) -> int:
    """The decoded size of base64 text, from its length alone (nothing is decoded)."""
    return len(text) * 3 // 4 - text[-2:].count("=")


def bound_bundle(
    data: dict, where: str, max_output: int, room: int, notes: list[str]
) -> tuple[dict, int, bool]:
    """One MIME bundle held to the bounds: (the bundle, the budget it spends, cut or dropped).

    Text parts are cut at max_output characters (or at `room`, what is left of the budget);
    images are kept whole when they fit in `room`, else dropped; application/json is kept whole
    when its JSON text is within max_output characters and `room`. Anything else (a type the
    protocol does not carry, a value of the wrong type) is dropped. Each cut or drop adds a
    note naming `where`. The interpreter's raw values are taken too (bytes: images are then
    encoded only once they are known to fit). When nothing changes `data` itself is returned:
    the common case costs a len() per part.
    """
    bundle: dict[str, Any] = {}
    changed = cut = False
    cost = 0
    for mime, value in data.items():
        left = max(room - cost, 0)
        drop = None
        if isinstance(value, bytes | bytearray) and mime not in BASE64_MIMES:
            value, changed = bytes(value).decode("utf-8", "replace"), True
        if mime in TEXT_MIMES:
            if not isinstance(value, str):
                drop = "dropped: not text"
            elif len(value) > min(max_output, left):
                keep = min(max_output, left)
                why = "max_output" if keep == max_output else "the rich-output budget left"
                add_note(notes, f"{where}: {mime} cut to {keep} of {len(value)} characters ({why})")
                value, changed, cut = value[:keep], True, True
            size = len(value) if drop is None else 0
        elif mime in BASE64_MIMES or mime == SVG_MIME:
            if isinstance(value, str):
                size = base64_size(value) if mime in BASE64_MIMES else len(value)
            elif isinstance(value, bytes | bytearray):
                size = len(value)
            else:
                size, drop = 0, "dropped: not a string"
            if drop is None and size > left:
                drop = f"of {size} bytes dropped: {left} of the rich-output budget was left"
            elif drop is None and not isinstance(value, str):
                value, changed = base64.b64encode(value).decode("ascii"), True
        elif mime == JSON_MIME:
            try:
                text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
                size = len(text)
            except (TypeError, ValueError, RecursionError):
                size, drop = 0, "dropped: not JSON data"
            if drop is None and size <= max_output and json_depth(value) > MAX_JSON_DEPTH:
                drop = f"dropped: nested deeper than {MAX_JSON_DEPTH} levels"
            if drop is None and size > max_output:
                drop = f"of {size} characters dropped: over max_output ({max_output})"
            elif drop is None and size > left:
                drop = f"of {size} characters dropped: {left} of the rich-output budget was left"
        else:
            size, drop = 0, "dropped: not a MIME type the protocol carries"
            mime = repr(mime[:40])
        if drop is not None:
            add_note(notes, f"{where}: {mime} {drop}")
            changed = cut = True
            continue
        cost += size
        bundle[mime] = value
    return (bundle if changed else data), cost, cut


def bound_answer(answer: dict[str, Any], max_output: int, budget: int) -> dict[str, Any]:
    """Hold an execute answer to its request's bounds, in place, and return it.

    stdout and stderr at most max_output characters; the result and the display outputs within
    the rich-output `budget` (bound_bundle, in that order; an output that no longer fits, with
    all after it, is dropped); the error's fields clipped; `result_truncated`,
    `outputs_truncated`, each cut output's `truncated` and `output_notes` say what was cut or
    dropped. The guest's own flags and notes are kept (bounded), never relied on; notes of cuts
    made here come first, so a guest cannot crowd them out. Cheap when nothing is over: a len()
    per text field and per MIME part, no copy, no encoding.
    """
    for name in ("stdout", "stderr"):
        text = answer.get(name)
        if isinstance(text, str) and len(text) > max_output:
            answer[name] = text[:max_output]
            answer[name + "_truncated"] = True
    notes: list[str] = []  # of the cuts made here
    result = answer.get("result")
    result_cut = answer.get("result_truncated") is True
    used = 0
    if result:
        result, used, cut = bound_bundle(result, "result", max_output, budget, notes)
        result_cut = result_cut or cut
    outputs = answer.get("outputs") or []
    outputs_cut = answer.get("outputs_truncated") is True
    if outputs:
        kept = []
        for index, output in enumerate(outputs):
            room = budget - used - OUTPUT_COST
            if room < 0:
                dropped = len(outputs) - index
                add_note(
                    notes,
                    f"outputs[{index}:]: {dropped} display outputs dropped: the execution's "
                    f"rich-output budget of {budget} bytes was spent",
                )
                outputs_cut = True
                break
            data, cost, cut = bound_bundle(
                output["data"], f"outputs[{index}]", max_output, room, notes
            )
            used += OUTPUT_COST + cost
            entry: dict[str, Any] = {"type": "display", "data": data}
            if cut or output.get("truncated") is True:
                entry["truncated"] = outputs_cut = True
            kept.append(entry)
        outputs = kept
    said = answer.get("output_notes")
    if notes or said:
        said = said[:MAX_NOTES] if isinstance(said, list) else []
        notes, own = [], notes
        for note in own + [n for n in said if isinstance(n, str)]:
            add_note(notes, note)
    answer.update(
        result=result or None,
        outputs=outputs,
        result_truncated=result_cut,
        outputs_truncated=outputs_cut,
        output_notes=notes,
    )
    error = answer.get("error")
    if isinstance(error, dict):
        for name, limit in (
            ("name", MAX_ERROR_NAME),
            ("value", MAX_ERROR_VALUE),
            ("traceback", MAX_TRACEBACK),
        ):
            text = error.get(name)
            if isinstance(text, str) and len(text) > limit:
                error[name] = clip(text, limit)
    return answer
