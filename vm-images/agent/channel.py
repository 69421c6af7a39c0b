"""The host's side of the agent: the channel its bytes come on, its frames, and answering it.

supervisor.py serves one host over one byte stream; everything that touches that stream is here:
the channels (VirtioChannel in the guest: a virtio-serial port that comes and goes with the host;
ListenChannel, a unix socket; FdChannel, an inherited socket for host tests), FrameReader (host
frames, shoal.protocol, resynchronised after garbage), and HostLink, the part of supervisor.Agent
that reads requests off the channel and writes answers (a request handler answers with
answer()/error(), or raises BadRequest). The non-blocking plumbing (Outbox, read_available,
readable) is shared with the kernel's socket and pipes and a shell command's pipes.
Standard library only.
"""

from __future__ import annotations

import fcntl
import glob
import logging
import os
import select
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from shoal_kernel_framing import json_utf8

from shoal import protocol

if TYPE_CHECKING:
    from file_requests import GetTransfer, PutTransfer
    from supervisor import Agent

log = logging.getLogger("shoal.agent")

DISCONNECTED_RECHECK_S = 5.0  # SIGIO is the wake-up; this is only a fallback
READ_SIZE = 256 << 10
MAGIC_TAIL = len(protocol.MAGIC) - 1  # bytes kept while resynchronising: a split magic


class BadRequest(Exception):
    """A request whose arguments the handler refuses: answered with invalid_argument."""


def json_bytes(message: dict) -> bytes:
    return json_utf8(message)


# --- byte plumbing ---------------------------------------------------------------------------
class Outbox:
    """Bytes waiting for a non-blocking descriptor; written as soon as it takes them."""

    def __init__(self) -> None:
        self.queue: deque[memoryview] = deque()
        self.size = 0

    def push(self, data: bytes) -> None:
        if data:
            self.queue.append(memoryview(data))
            self.size += len(data)

    def flush(self, fd: int) -> None:
        """Write what the descriptor takes now; OSError (EPIPE, EIO...) goes to the caller."""
        queue = self.queue
        while queue:
            try:
                n = os.write(fd, queue[0])
            except BlockingIOError:
                return
            self.size -= n
            if n == len(queue[0]):
                queue.popleft()
            else:
                queue[0] = queue[0][n:]

    def clear(self) -> None:
        self.queue.clear()
        self.size = 0


def set_nonblocking(fd: int) -> None:
    os.set_blocking(fd, False)


def read_available(fd: int, sink: Callable[[bytes], Any], max_reads: int = 64) -> bool:
    """Read what is there now (a pipe or socket) into sink(bytes); False at EOF or error (then
    stop watching fd). A short read means it is drained: no read that fails with EAGAIN just
    to learn so (under TCG a raised exception costs tens of microseconds)."""
    for _ in range(max_reads):
        try:
            data = os.read(fd, READ_SIZE)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if not data:
            return False
        sink(data)
        if len(data) < READ_SIZE:
            return True
    return True


def readable(fds: list[int]) -> list[int]:
    """The descriptors among `fds` with something to read now (one poll, no waiting)."""
    p = select.poll()
    for fd in fds:
        p.register(fd, select.POLLIN)
    return [fd for fd, _ in p.poll(0)]


class FrameReader:
    """Parses host frames out of a byte stream; after a bad header it resynchronises on MAGIC."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.resync = False

    def clear(self) -> None:
        self.buf.clear()
        self.resync = False

    def next(self) -> tuple[str, Any, bytes] | None:
        """("frame", message, blob), ("bad", (id, reason), b""), or None: more bytes needed."""
        buf = self.buf
        if self.resync:
            i = buf.find(protocol.MAGIC)
            if i < 0:
                del buf[: max(0, len(buf) - MAGIC_TAIL)]
                return None
            del buf[:i]
            self.resync = False
        if len(buf) < protocol.HEADER.size:
            head = bytes(buf[:4])
            if head and not protocol.MAGIC.startswith(head):
                del buf[:1]
                self.resync = True
                return ("bad", (None, f"bad magic {head!r}"), b"")
            return None
        try:
            json_len, blob_len = protocol.parse_header(
                bytes(buf[: protocol.HEADER.size]), protocol.MAX_JSON_TO_GUEST, protocol.MAX_BLOB
            )
        except protocol.ProtocolError as exc:
            del buf[:1]
            self.resync = True
            return ("bad", (None, str(exc)), b"")
        end = protocol.HEADER.size + json_len + blob_len
        if len(buf) < end:
            return None
        body = bytes(buf[protocol.HEADER.size : protocol.HEADER.size + json_len])
        blob = bytes(buf[protocol.HEADER.size + json_len : end])
        del buf[:end]
        try:
            message = protocol.parse_body(body)
        except protocol.ProtocolError as exc:
            return ("bad", (None, str(exc)), b"")
        return ("frame", message, blob)


# --- requests in, answers out ----------------------------------------------------------------
class HostLink:
    """Part of supervisor.Agent: reads the host's requests off the channel (to Agent._handle) and
    writes the answers. The state is the Agent's."""

    channel: Channel
    reader: FrameReader
    outbox: Outbox
    transfer: GetTransfer | PutTransfer | None

    def on_connect(self) -> None:
        self.reader.clear()
        self.outbox.clear()

    def on_disconnect(self) -> None:
        self.reader.clear()
        self.outbox.clear()
        if self.transfer is not None:
            log.info("host left during a transfer; dropping it")
            self.transfer.close()
            self.transfer = None

    def _channel_event(self, ev: int) -> None:
        ch = self.channel
        fd = ch.fd
        if ev & select.POLLOUT:
            try:
                self.outbox.flush(fd)
            except OSError:
                ch.hangup()
                return
        if ev & (select.POLLIN | select.POLLHUP | select.POLLERR | select.POLLNVAL):
            eof = False
            for _ in range(16):
                try:
                    data = os.read(fd, READ_SIZE)
                except BlockingIOError:
                    break
                except OSError:
                    eof = True
                    break
                if not data:
                    eof = True
                    break
                self.reader.buf += data
                self._process_input()
                if self.channel.fd != fd:
                    return
                # A virtio port hands out one buffer per read: ask before reading again, rather
                # than read until EAGAIN (a raised exception costs more than a poll here).
                if len(data) < READ_SIZE and not readable([fd]):
                    break
            if eof:
                ch.hangup()

    def _process_input(self) -> None:
        while self.channel.fd is not None:
            item = self.reader.next()
            if item is None:
                return
            kind, payload, blob = item
            if kind == "bad":
                request_id, reason = payload
                self.send(protocol.error_message(request_id, protocol.E_BAD_FRAME, reason))
                continue
            self._handle(payload, blob)

    def send(self, message: dict, blob: bytes = b"") -> None:
        ch = self.channel
        if ch.fd is None:
            return  # nobody to tell: a later host does not know this id
        body = json_bytes(message)
        if len(body) > protocol.MAX_JSON_FROM_GUEST:
            log.error("answer of %d bytes over the limit; sending an error instead", len(body))
            body = json_bytes(
                protocol.error_message(
                    message.get("id"), protocol.E_INTERNAL, "answer over the size limit"
                )
            )
        self.send_body(body, blob)

    def send_body(self, body: bytes, blob: bytes = b"") -> None:
        ch = self.channel
        if ch.fd is None:
            return
        # The blob (a file chunk) is queued as it is: joined to the header it would be copied
        # once more, and under TCG a copy of 256 KiB costs as much as writing it to the port.
        self.outbox.push(protocol.HEADER.pack(protocol.MAGIC, len(body), len(blob)) + body)
        self.outbox.push(blob)
        try:
            self.outbox.flush(ch.fd)
        except OSError:
            ch.hangup()

    def answer(self, request_id: int, **fields: Any) -> None:
        fields["id"] = request_id
        fields["ok"] = True
        self.send(fields)

    def error(self, request_id: Any, code: str, message: str) -> None:
        self.send(protocol.error_message(request_id, code, message))


# --- the host channel ------------------------------------------------------------------------
class Channel:
    """The byte stream to the host. `fd` is None while no host is connected."""

    fd: int | None = None
    agent: Agent

    def start(self) -> None:
        """Called once by Agent.run(), after the signal handlers exist."""

    def watch(self) -> list[tuple[int, int]]:
        """Extra (fd, events) to poll besides `fd` (a listening socket)."""
        return []

    def on_event(self, fd: int) -> None:
        pass

    def hangup(self) -> None:
        raise NotImplementedError

    def recheck_after(self) -> float | None:
        return None

    def recheck(self) -> None:
        pass


class FdChannel(Channel):
    """An inherited connected socket (host tests). EOF ends the agent."""

    def __init__(self, fd: int):
        set_nonblocking(fd)
        self.fd = fd

    def start(self) -> None:
        self.agent.on_connect()

    def hangup(self) -> None:
        log.info("host closed the channel; exiting")
        self.agent.stopping = True
        self.fd = None


class ListenChannel(Channel):
    """A listening unix socket; one host at a time, a new connection replaces the old one."""

    def __init__(self, path: str):
        if os.path.exists(path):
            os.unlink(path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(4)
        self.listener.setblocking(False)
        self.conn: socket.socket | None = None

    def watch(self) -> list[tuple[int, int]]:
        return [(self.listener.fileno(), select.POLLIN)]

    def on_event(self, fd: int) -> None:
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return
        if self.conn is not None:
            self.hangup()
        conn.setblocking(False)
        self.conn = conn
        self.fd = conn.fileno()
        self.agent.on_connect()

    def hangup(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.conn = None
        self.fd = None
        self.agent.on_disconnect()


class VirtioChannel(Channel):
    """A virtio-serial port. While no host is connected poll() reports POLLHUP at once and reads
    give EOF, so the agent stops watching the port and waits for the SIGIO that virtio_console
    sends on host connect (O_ASYNC + F_SETOWN), with a slow fallback re-check."""

    def __init__(self, path: str):
        self.path = path
        self.port = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self.connected = False

    def start(self) -> None:
        self._set_async(True)
        self.recheck()

    def _set_async(self, on: bool) -> None:
        flags = fcntl.fcntl(self.port, fcntl.F_GETFL)
        if on:
            fcntl.fcntl(self.port, fcntl.F_SETOWN, os.getpid())
            fcntl.fcntl(self.port, fcntl.F_SETFL, flags | os.O_ASYNC)
        else:
            fcntl.fcntl(self.port, fcntl.F_SETFL, flags & ~os.O_ASYNC)

    def _host_connected(self) -> bool:
        p = select.poll()
        p.register(self.port, select.POLLIN)
        events = p.poll(0)
        return not (events and events[0][1] & select.POLLHUP)

    def recheck_after(self) -> float | None:
        return None if self.connected else DISCONNECTED_RECHECK_S

    def recheck(self) -> None:
        if self.connected or not self._host_connected():
            return
        # Connected: SIGIO would now fire for every incoming byte; poll() covers that.
        self._set_async(False)
        self.connected = True
        self.fd = self.port
        log.info("host connected")
        self.agent.on_connect()

    def hangup(self) -> None:
        # Drop whatever the old host left in the port, then sleep until SIGIO.
        while True:
            try:
                if not os.read(self.port, READ_SIZE):
                    break
            except OSError:
                break
        self.connected = False
        self.fd = None
        self._set_async(True)
        log.info("host disconnected")
        self.agent.on_disconnect()
        self.recheck()  # a host that came back before O_ASYNC was set sent no SIGIO


def find_virtio_port(name: str) -> str:
    for name_file in sorted(glob.glob("/sys/class/virtio-ports/vport*/name")):
        try:
            with open(name_file) as f:
                if f.read().strip() == name:
                    return "/dev/" + os.path.basename(os.path.dirname(name_file))
        except OSError:
            continue
    raise FileNotFoundError(f"no virtio-serial port named {name}")


def wait_for_port() -> str:
    """The port appears once virtio_console is loaded; init loads it before us, but be patient."""
    for attempt in range(600):
        try:
            return find_virtio_port(protocol.CHANNEL_NAME)
        except FileNotFoundError:
            if attempt % 50 == 0:
                log.warning("waiting for virtio-serial port %s", protocol.CHANNEL_NAME)
            time.sleep(0.1)
    raise FileNotFoundError(f"no virtio-serial port named {protocol.CHANNEL_NAME}")
