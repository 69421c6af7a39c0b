"""Host-side client of the guest agent (docs/agent-protocol.md).

One AgentClient per connection to a VM's virtio-serial chardev socket. Calls are synchronous and
meant for one thread at a time, except interrupt(), which may be called from another thread while
execute() blocks. Whoever waits reads the socket for everyone ("leader" reading): answers for
another waiting call are handed over, so there is no reader thread and no per-call thread.

Everything the guest sends is hostile. Frames over protocol.MAX_JSON_FROM_GUEST / MAX_BLOB,
bad magic, non-JSON or answers of the wrong shape raise AgentProtocolError: the caller should
destroy the VM. An execute answer of the right shape is then held to its request's output bounds
(protocol.bound_answer), whatever the guest says it did. An answer that does not come in time
raises AgentTimeout, a closed connection AgentDisconnected, a clean error answer
AgentError(code, message).
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import os
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from shoal import protocol

DEFAULT_TIMEOUT_S = 30.0
ANSWER_MARGIN_S = 5.0  # on top of timeout_s + grace: transfer, kernel restart, a slow guest
RECV_SIZE = 256 << 10

EXECUTE_STATUSES = frozenset(
    {
        protocol.STATUS_OK,
        protocol.STATUS_ERROR,
        protocol.STATUS_TIMED_OUT,
        protocol.STATUS_INTERRUPTED,
    }
)


class AgentClientError(Exception):
    """Base of the errors below."""


class AgentError(AgentClientError):
    """The agent answered the request with an error."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class AgentProtocolError(AgentClientError):
    """The guest broke the protocol (garbage, over a limit, wrong shape). Destroy the VM."""


class AgentTimeout(AgentClientError):
    """No answer in time."""


class AgentDisconnected(AgentClientError):
    """The connection is closed."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _bundle_ok(bundle: Any) -> bool:
    return isinstance(bundle, dict) and all(isinstance(k, str) for k in bundle)


def _entry_ok(entry: Any) -> bool:
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("path"), str)
        and isinstance(entry.get("name"), str)
        and isinstance(entry.get("type"), str)
        and _is_int(entry.get("size"))
        and _is_number(entry.get("mtime"))
    )


def validate_execute(answer: dict[str, Any]) -> dict[str, Any]:
    """The execute answer's shape, or AgentProtocolError."""
    checks = (
        answer.get("status") in EXECUTE_STATUSES,
        isinstance(answer.get("stdout"), str),
        isinstance(answer.get("stderr"), str),
        isinstance(answer.get("stdout_truncated"), bool),
        isinstance(answer.get("stderr_truncated"), bool),
        answer.get("result") is None or _bundle_ok(answer.get("result")),
        isinstance(answer.get("outputs"), list)
        and all(isinstance(o, dict) and _bundle_ok(o.get("data")) for o in answer["outputs"]),
        answer.get("error") is None
        or (
            isinstance(answer["error"], dict)
            and all(isinstance(answer["error"].get(f), str) for f in ("name", "value", "traceback"))
        ),
        answer.get("exit_code") is None or _is_int(answer.get("exit_code")),
        isinstance(answer.get("interpreter_restarted"), bool),
        _is_number(answer.get("duration_ms")),
    )
    if not all(checks):
        raise AgentProtocolError("malformed execute answer")
    return answer


class AgentClient:
    """A connection to one guest agent."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        interrupt_grace_s: float = protocol.INTERRUPT_GRACE_S,
        answer_margin_s: float = ANSWER_MARGIN_S,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ):
        self._sock = sock
        sock.setblocking(False)
        self._fd = sock.fileno()
        self.interrupt_grace_s = interrupt_grace_s
        self.answer_margin_s = answer_margin_s
        self.timeout_s = timeout_s
        # Said by the agent's last hello: uploads may go through the VM's transfer disk.
        self.has_transfer_disk = False
        self._ids = itertools.count(1)
        self._send_lock = threading.Lock()
        self._cond = threading.Condition()
        self._reading = False
        self._pending: set[int] = set()
        self._inbox: dict[int, deque[tuple[dict, bytes]]] = {}
        self._broken: AgentClientError | None = None
        self._buf = bytearray()
        self._chunk = bytearray(RECV_SIZE)
        self._rpoll = select.poll()
        self._rpoll.register(self._fd, select.POLLIN)

    @classmethod
    def connect(cls, path: str, timeout: float = 10.0, **kwargs: Any) -> AgentClient:
        """Connect to a unix socket (the VM's virtio-serial chardev)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except TimeoutError:
            sock.close()
            raise AgentTimeout(f"connecting to {path} timed out") from None
        except OSError as exc:
            sock.close()
            raise AgentDisconnected(f"cannot connect to {path}: {exc}") from None
        return cls(sock, **kwargs)

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        with self._cond:
            if self._broken is None:
                self._broken = AgentDisconnected("client closed")
            self._cond.notify_all()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()

    # --- operations -------------------------------------------------------------------------
    def hello(self, packages: bool = True, timeout: float | None = None) -> dict[str, Any]:
        answer = self._call({"op": protocol.OP_HELLO, "packages": packages}, timeout)
        if not (
            _is_int(answer.get("protocol_version"))
            and isinstance(answer.get("agent_version"), str)
            and isinstance(answer.get("python_version"), str)
        ):
            raise AgentProtocolError("malformed hello answer")
        pkgs = answer.get("packages")
        if packages and not (
            isinstance(pkgs, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in pkgs.items())
        ):
            raise AgentProtocolError("malformed package list")
        self.has_transfer_disk = answer.get("transfer_disk") is True
        return answer

    def ping(self, timeout: float = 5.0) -> dict[str, Any]:
        return self._call({"op": protocol.OP_PING}, timeout)

    def prepare_snapshot(self, timeout: float = 60.0) -> dict[str, Any]:
        """Sync and drop the guest's page cache before the VM is saved as a template."""
        return self._call({"op": protocol.OP_PREPARE_SNAPSHOT}, timeout)

    def execute(
        self,
        code: str,
        language: str = "python",
        timeout_s: float = 60,
        max_output: int = protocol.DEFAULT_MAX_OUTPUT,
        grace_s: float | None = None,
        max_rich_output_bytes: int = protocol.DEFAULT_RICH_OUTPUT_BYTES,
    ) -> dict[str, Any]:
        """Run code; the answer dict (status, stdout, stderr, result, outputs, error, ...),
        within max_output characters per text part and the rich-output budget.

        Waits at most timeout_s + grace_s (default: the agent's interrupt grace + a margin).
        """
        if grace_s is None:
            grace_s = self.interrupt_grace_s + self.answer_margin_s
        request = {
            "op": protocol.OP_EXECUTE,
            "code": code,
            "language": language,
            "timeout_s": timeout_s,
            "max_output": max_output,
            "max_rich_output_bytes": max_rich_output_bytes,
        }
        answer = validate_execute(self._call(request, timeout_s + grace_s))
        return protocol.bound_answer(answer, max_output, max_rich_output_bytes)

    def interrupt(self, timeout: float = 5.0) -> dict[str, Any]:
        """Interrupt the running execution (or file_get); safe from another thread."""
        return self._call({"op": protocol.OP_INTERRUPT}, timeout)

    def reseed(
        self,
        time_ns: int | None = None,
        entropy: bytes | None = None,
        timeout: float = 10.0,
        identity: str | None = None,
    ) -> dict[str, Any]:
        """Set the guest clock and mix fresh entropy in (after every snapshot restore); with
        `identity`, the guest records the id the host gave this VM in /run/shoal/identity."""
        request = {
            "op": protocol.OP_RESEED,
            "time_ns": time.time_ns() if time_ns is None else time_ns,
            "entropy": base64.b64encode(os.urandom(64) if entropy is None else entropy).decode(),
        }
        if identity is not None:
            request["identity"] = identity
        return self._call(request, timeout)

    def put_file(
        self, path: str, chunks: Iterable[bytes], timeout: float | None = None
    ) -> dict[str, Any]:
        """Upload; chunks of any size are re-cut to protocol.FILE_CHUNK. Returns the stat entry.

        timeout bounds each step (the go-ahead, each chunk's send, the final answer).
        """

        def send(rid: int, header: dict, timeout: float) -> int:
            size = protocol.FILE_CHUNK
            for chunk in chunks:
                view = memoryview(chunk)
                for start in range(0, len(view), size):
                    self._send(protocol.encode(header, view[start : start + size]), timeout)
            return 0

        return self._put({"op": protocol.OP_FILE_PUT, "path": path}, send, timeout)

    def put_file_via_disk(
        self, path: str, segments: Iterator[tuple[int, int]], timeout: float | None = None
    ) -> dict[str, Any]:
        """Upload whose bytes are in the VM's transfer disk (workers/transfer_disk.py): each
        (offset, length) `segments` yields is named to the agent, which copies it into the file
        and says so. `segments` is resumed only while fewer than TRANSFER_SLOTS segments await
        the agent, so no slot of the ring is written before the guest copied it. Returns the
        stat entry; timeout bounds each step, as in put_file."""

        def send(rid: int, header: dict, timeout: float) -> int:
            awaiting = 0
            for offset, length in segments:
                self._send(protocol.encode({**header, "disk": [offset, length]}), timeout)
                awaiting += 1
                while awaiting >= protocol.TRANSFER_SLOTS:
                    self._copied(rid, timeout)
                    awaiting -= 1
            return awaiting

        request = {"op": protocol.OP_FILE_PUT, "path": path, "via_disk": True}
        return self._put(request, send, timeout)

    def _put(
        self,
        request: dict[str, Any],
        send: Callable[[int, dict, float], int],
        timeout: float | None,
    ) -> dict[str, Any]:
        """A file_put: the go-ahead, the body (`send(id, chunk header, timeout)`, which returns
        how many copied-segment answers are still due), the end, then the file's entry."""
        timeout = self.timeout_s if timeout is None else timeout
        rid = self._start(request)
        try:
            ready = self._answer(rid, time.monotonic() + timeout)
            if ready.get("ready") is not True:
                raise AgentProtocolError("file_put: no go-ahead")
            header = {"id": rid, "op": protocol.OP_CHUNK}
            eof = protocol.encode({**header, "eof": True})
            try:
                due = send(rid, header, timeout)
            except AgentError:
                # The guest refused a segment (its disk is full, say) and dropped the file; it
                # keeps the request open until the end is sent.
                self._send(eof, timeout)
                raise
            except AgentClientError:
                raise
            except BaseException:
                # The source failed (an abandoned or oversized upload): cancel the upload in
                # the guest, which removes its temporary file, so the agent is free again.
                with contextlib.suppress(AgentClientError):
                    self.interrupt(timeout)
                raise
            self._send(eof, timeout)
            for _ in range(due):
                self._copied(rid, timeout)
            answer = self._answer(rid, time.monotonic() + timeout)
        finally:
            self._finish(rid)
        if not _entry_ok(answer):
            raise AgentProtocolError("malformed file_put answer")
        return answer

    def _copied(self, rid: int, timeout: float) -> None:
        """The agent's word that it copied the oldest segment it was given."""
        answer = self._answer(rid, time.monotonic() + timeout)
        if answer.get("op") != protocol.OP_CHUNK or answer.get("copied") is not True:
            raise AgentProtocolError("file_put: expected a copied segment")

    def get_file(self, path: str, timeout: float | None = None) -> Download:
        """Download: the agent's first answer (errors raise here), then an iterator of chunks."""
        return self.open_file(path, timeout)[1]

    def open_file(self, path: str, timeout: float | None = None) -> tuple[dict, Download]:
        """Start a download: the file's entry, as the agent has it open, and its chunks.

        Errors raise here, before any byte moves: a directory, a link, a FIFO, a socket or a
        device is refused by the agent. timeout bounds the wait for each chunk. Closing the
        chunks before the end, even unread, cancels the transfer in the guest."""
        timeout = self.timeout_s if timeout is None else timeout
        rid = self._start({"op": protocol.OP_FILE_GET, "path": path})
        try:
            header = self._answer(rid, time.monotonic() + timeout)
            if not _entry_ok(header):
                raise AgentProtocolError("malformed file_get answer")
        except BaseException:
            self._finish(rid)
            raise
        return header, Download(self, rid, timeout)

    def list_files(
        self, path: str = "", recursive: bool = False, timeout: float | None = None
    ) -> list[dict[str, Any]]:
        """Entries {path, name, type, size, mtime}, sorted by path (at most 100,000)."""
        answer = self._call(
            {"op": protocol.OP_FILE_LIST, "path": path, "recursive": recursive}, timeout
        )
        entries = answer.get("entries")
        if not isinstance(entries, list) or not all(_entry_ok(e) for e in entries):
            raise AgentProtocolError("malformed file_list answer")
        return entries

    def stat(self, path: str, timeout: float | None = None) -> dict[str, Any]:
        answer = self._call({"op": protocol.OP_FILE_STAT, "path": path}, timeout)
        if not _entry_ok(answer):
            raise AgentProtocolError("malformed file_stat answer")
        return answer

    def delete(self, path: str, recursive: bool = False, timeout: float | None = None) -> dict:
        return self._call(
            {"op": protocol.OP_FILE_DELETE, "path": path, "recursive": recursive}, timeout
        )

    # --- requests and answers ---------------------------------------------------------------
    def _call(self, request: dict[str, Any], timeout: float | None) -> dict[str, Any]:
        timeout = self.timeout_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        rid = self._start(request, timeout)
        try:
            return self._answer(rid, deadline)
        finally:
            self._finish(rid)

    def _start(self, request: dict[str, Any], timeout: float | None = None) -> int:
        rid = next(self._ids)
        request["id"] = rid
        with self._cond:
            if self._broken is not None:
                raise self._broken
            self._pending.add(rid)
        try:
            self._send(protocol.encode(request), self.timeout_s if timeout is None else timeout)
        except BaseException:
            self._finish(rid)
            raise
        return rid

    def _finish(self, rid: int) -> None:
        with self._cond:
            self._pending.discard(rid)
            self._inbox.pop(rid, None)

    @staticmethod
    def _error(message: dict[str, Any]) -> AgentError:
        error = message.get("error")
        if not (
            isinstance(error, dict)
            and isinstance(error.get("code"), str)
            and isinstance(error.get("message"), str)
        ):
            raise AgentProtocolError("malformed error answer")
        return AgentError(error["code"], error["message"])

    def _answer(self, rid: int, deadline: float) -> dict[str, Any]:
        message, _ = self._next(rid, deadline)
        ok = message.get("ok")
        if ok is True:
            del message["ok"], message["id"]
            return message
        if ok is False:
            raise self._error(message)
        raise AgentProtocolError("answer without ok")

    def _send(self, data: bytes, timeout: float) -> None:
        with self._send_lock:
            if self._broken is not None:
                raise self._broken
            view = memoryview(data)
            deadline = None
            try:
                while view:
                    try:
                        n = self._sock.send(view)
                    except BlockingIOError:
                        if deadline is None:
                            deadline = time.monotonic() + timeout
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            raise self._fail(
                                AgentTimeout("sending to the agent timed out")
                            ) from None
                        select.select([], [self._fd], [], remaining)
                        continue
                    view = view[n:]
            except OSError as exc:
                raise self._fail(AgentDisconnected(f"send failed: {exc}")) from None

    def _fail(self, exc: AgentClientError) -> AgentClientError:
        """Mark the connection unusable (a partial frame may be on the wire) and return exc."""
        with self._cond:
            if self._broken is None:
                self._broken = exc
            self._cond.notify_all()
        return exc

    def _next(self, rid: int, deadline: float) -> tuple[dict[str, Any], bytes]:
        """The next frame for request rid; reads the socket unless another thread is."""
        with self._cond:
            while True:
                queue = self._inbox.get(rid)
                if queue:
                    return queue.popleft()
                if self._broken is not None:
                    raise self._broken
                if not self._reading:
                    self._reading = True
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AgentTimeout("no answer from the agent in time")
                self._cond.wait(remaining)
        try:
            while True:
                frame = self._read_frame(deadline)
                fid = frame[0].get("id")
                if fid == rid:
                    return frame
                with self._cond:
                    if fid in self._pending:
                        self._inbox.setdefault(fid, deque()).append(frame)
                        self._cond.notify_all()
                    # else: a late answer to a call that gave up, or a stale frame: dropped
                if time.monotonic() > deadline:  # a guest that never pauses still runs out
                    raise AgentTimeout("no answer from the agent in time")
        except (AgentProtocolError, AgentDisconnected) as exc:
            raise self._fail(exc) from None
        finally:
            with self._cond:
                self._reading = False
                self._cond.notify_all()

    def _read_frame(self, deadline: float) -> tuple[dict[str, Any], bytes]:
        buf = self._buf
        header_size = protocol.HEADER.size
        while True:
            if len(buf) >= header_size:
                try:
                    json_len, blob_len = protocol.parse_header(
                        bytes(buf[:header_size]), protocol.MAX_JSON_FROM_GUEST, protocol.MAX_BLOB
                    )
                except protocol.ProtocolError as exc:
                    raise AgentProtocolError(str(exc)) from None
                end = header_size + json_len + blob_len
                if len(buf) >= end:
                    body = bytes(buf[header_size : header_size + json_len])
                    blob = bytes(buf[header_size + json_len : end])
                    del buf[:end]
                    try:
                        message = protocol.parse_body(body)
                    except protocol.ProtocolError as exc:
                        raise AgentProtocolError(str(exc)) from None
                    if not _is_int(message.get("id")):
                        if message.get("ok") is False and message.get("id") is None:
                            continue  # the agent complaining about a frame it could not parse
                        raise AgentProtocolError("frame without an integer id")
                    return message, blob
            elif buf and not protocol.MAGIC.startswith(bytes(buf[:4])):
                raise AgentProtocolError(f"bad magic {bytes(buf[:4])!r}")
            self._fill(deadline)

    def _fill(self, deadline: float) -> None:
        while True:
            try:
                n = self._sock.recv_into(self._chunk)
            except BlockingIOError:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AgentTimeout("no answer from the agent in time") from None
                self._rpoll.poll(remaining * 1000 + 1)
                continue
            except OSError as exc:
                raise AgentDisconnected(f"receive failed: {exc}") from None
            if n == 0:
                raise AgentDisconnected("the agent closed the connection")
            self._buf += memoryview(self._chunk)[:n]
            return


class Download:
    """The chunks of a file_get, as an iterator. Ended early (closed, or a failure of the host's
    own) it interrupts the agent's stream, so the agent is free again; a failure of the guest's
    (an error frame, a broken connection) ends it as it is."""

    def __init__(self, client: AgentClient, rid: int, timeout: float) -> None:
        self._client = client
        self._rid = rid
        self._timeout = timeout
        self._done = False

    def __iter__(self) -> Download:
        return self

    def __next__(self) -> bytes:
        client = self._client
        while not self._done:
            try:
                message, blob = client._next(self._rid, time.monotonic() + self._timeout)
            except BaseException:
                self.close()
                raise
            if message.get("ok") is False:
                self._end()
                raise client._error(message)
            if message.get("op") != protocol.OP_CHUNK:
                self.close()
                raise AgentProtocolError("file_get: expected a chunk frame")
            if message.get("eof") is True:
                self._end()
                break
            if blob:
                return blob
        raise StopIteration

    def close(self) -> None:
        """Cancel the stream if it has not ended: stop the agent, then skip what is in flight."""
        if self._done:
            return
        if self._client._broken is None:
            with contextlib.suppress(AgentClientError):
                self._client.interrupt(timeout=self._timeout)
        self._end()

    def _end(self) -> None:
        self._done = True
        self._client._finish(self._rid)
