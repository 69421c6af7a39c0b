"""Shoal guest agent (entry point: agent.py): answers the host over one byte stream.

The protocol is in docs/agent-protocol.md.

In the guest it runs as PID 1 (root) with no arguments: it finds the virtio-serial port named
protocol.CHANNEL_NAME, serves requests on it, supervises an interpreter process (kernel.py,
shoal_kernel.py) that runs user code as the sandbox user in /mnt/data, runs shell commands, and
moves files in and out of /mnt/data.

One thread, one poll() loop: the host channel, the kernel's control socket and output pipes, a
running shell command's pipes and the signal wakeup pipe (SIGCHLD, SIGIO) are all watched at once,
so an interrupt is read while an execution runs and an idle agent sleeps in poll() with no timeout.

For tests on the host:  agent.py --fd N --data-dir DIR --user none
(N: one end of a socketpair the caller passed down; the agent exits when it reaches EOF).
Standard library only.
"""

from __future__ import annotations

import argparse
import base64
import codecs
import contextlib
import fcntl
import glob
import hashlib
import importlib.metadata
import json
import logging
import mmap
import os
import pwd
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import deque
from typing import Any

if not os.path.isdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), "shoal")):
    # A source checkout, vm-images/agent/ (the image has shoal/protocol.py next to the agent):
    # the repository's own shoal.protocol, even when another one is installed.
    sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import files
from shoal_kernel_framing import encode_message, take_messages

from shoal import protocol

AGENT_VERSION = "0.1.0"
HERE = os.path.dirname(os.path.abspath(__file__))
log = logging.getLogger("shoal.agent")

REAP_GRACE_S = 2.0  # after SIGKILL, answer even if the process has not been reaped yet
CTRL_EOF_KILL_S = 1.0  # a kernel that closed its control socket but lives on is killed
DISCONNECTED_RECHECK_S = 5.0  # SIGIO is the wake-up; this is only a fallback
MAX_TIMEOUT_S = 24 * 3600.0
KERNEL_MAX_MESSAGE = protocol.MAX_JSON_FROM_GUEST - (2 << 20)  # read from the kernel
KERNEL_START_FAILURES = 3  # an execution waiting for a kernel gives up after this many
OUT_HIGH_WATER = 4 * protocol.FILE_CHUNK  # file_get reads ahead no further than this
READ_SIZE = 256 << 10
STDERR_TAIL = 4096
MAGIC_TAIL = len(protocol.MAGIC) - 1  # bytes kept while resynchronising: a split magic
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207
INHERITED_ENV = ("MPLCONFIGDIR", "IPYTHONDIR", "OPENBLAS_CORETYPE", "TZ")
DATA_DISK_ERROR_FILE = "/run/shoal/data-disk-error"  # written by the guest's init
IDENTITY_FILE = "/run/shoal/identity"  # the VM id the host gave at restore (root-owned)
IDENTITY = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
ALWAYS_ANSWERED = frozenset({protocol.OP_HELLO, protocol.OP_PING, protocol.OP_INTERRUPT})
LANGUAGES = frozenset({"python", "shell"})


class BadRequest(Exception):
    pass


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


class Capture:
    """One output stream of an execution: the first `limit` characters kept, the rest counted."""

    def __init__(self, limit: int):
        self.limit = limit
        self.parts: list[str] = []
        self.chars = 0
        self.bytes = 0
        self.truncated = False
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def feed(self, data: bytes) -> None:
        self.bytes += len(data)
        if self.truncated:
            return
        self._add(self.decoder.decode(data))

    def _add(self, text: str) -> None:
        room = self.limit - self.chars
        if len(text) > room:
            text = text[:room]
            self.truncated = True
        if text:
            self.parts.append(text)
            self.chars += len(text)

    def text(self) -> str:
        if not self.truncated:
            self._add(self.decoder.decode(b"", final=True))
        return "".join(self.parts)


def set_nonblocking(fd: int) -> None:
    os.set_blocking(fd, False)


def read_available(fd: int, sink, max_reads: int = 64) -> bool:
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


# --- the kernel ------------------------------------------------------------------------------
class Kernel:
    """One interpreter process: its pid, control socket and output pipes."""

    def __init__(self, agent: Agent, generation: int):
        self.agent = agent
        self.generation = generation
        self.ready = False
        self.started = time.monotonic()
        self.inbuf = bytearray()
        self.outbox = Outbox()
        self.killed = False
        self.used = False  # has run an execution: its death loses the user's state
        self.retiring = False  # said it is exiting (user code called exit()): send it nothing
        self.kill_at: float | None = None
        self.kill_reason = ""
        self.python_version = ""
        self.stderr_tail = bytearray()
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        # Shared with the kernel: the id of the execution an interrupt is for (see shoal_kernel.py).
        shm_fd = os.memfd_create("shoal-interrupt", os.MFD_CLOEXEC)
        os.ftruncate(shm_fd, 8)
        self.shared = mmap.mmap(shm_fd, 8)
        env = dict(agent.user_env)
        env["SHOAL_KERNEL_FD"] = str(child.fileno())
        env["SHOAL_INTERRUPT_FD"] = str(shm_fd)
        try:
            self.proc = subprocess.Popen(
                [agent.python, os.path.join(HERE, "kernel.py")],
                stdin=subprocess.DEVNULL,
                stdout=out_w,
                stderr=err_w,
                pass_fds=(child.fileno(), shm_fd),
                cwd=agent.data_dir.root,
                env=env,
                process_group=0,
                **agent.drop_privileges,
            )
        except BaseException:
            for fd in (out_r, err_r):
                os.close(fd)
            parent.close()
            raise
        finally:
            child.close()
            os.close(out_w)
            os.close(err_w)
            os.close(shm_fd)
        self.pid = self.proc.pid
        self.ctrl = parent
        self.ctrl.setblocking(False)
        self.ctrl_fd: int | None = parent.fileno()
        self.stdout_fd: int | None = out_r
        self.stderr_fd: int | None = err_r
        set_nonblocking(out_r)
        set_nonblocking(err_r)

    def send(self, message: dict) -> None:
        self.outbox.push(encode_message(message))
        self.flush()

    def flush(self) -> None:
        if self.ctrl_fd is None:
            return
        try:
            self.outbox.flush(self.ctrl_fd)
        except OSError:
            self.outbox.clear()
            self.kill("control socket write failed")

    def interrupt(self, seq: int) -> None:
        """KeyboardInterrupt in execution seq's cell, even if it has not quite started yet."""
        if not self.killed:
            struct.pack_into("<Q", self.shared, 0, seq)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGINT)

    def kill(self, reason: str) -> None:
        if not self.killed:
            log.warning("killing kernel %d: %s", self.pid, reason)
            self.kill_reason = reason
        self.killed = True
        self.kill_group()

    def kill_group(self) -> None:
        """SIGKILL the kernel and whatever it started in its process group."""
        for target in (lambda: os.killpg(self.pid, signal.SIGKILL), lambda: os.kill(self.pid, 9)):
            with contextlib.suppress(OSError):
                target()

    def close_fds(self, sink=None) -> None:
        """Drain the output pipes into sink, then close everything (the process has exited)."""
        for attr in ("stdout_fd", "stderr_fd"):
            fd = getattr(self, attr)
            if fd is not None:
                if sink is not None:
                    read_available(fd, lambda data, a=attr: sink(a, data))
                os.close(fd)
                setattr(self, attr, None)
        if self.ctrl_fd is not None:
            self.ctrl.close()
            self.ctrl_fd = None
        if not self.shared.closed:
            self.shared.close()


# --- executions and transfers ----------------------------------------------------------------
class Execution:
    def __init__(self, request_id: int, language: str, code: str, timeout_s: float, limit: int):
        self.id = request_id
        self.language = language
        self.code = code
        self.started = time.monotonic()
        self.deadline = self.started + timeout_s
        self.timeout_s = timeout_s
        self.stdout = Capture(limit)
        self.stderr = Capture(limit)
        self.interrupt_reason: str | None = None  # "interrupted" | "timed_out"
        self.kill_at: float | None = None  # interrupt grace runs out
        self.abandon_at: float | None = None  # killed but not reaped: answer anyway
        self.kernel: Kernel | None = None  # python: the kernel it was sent to
        self.seq = 0
        self.sent_at: float | None = None  # python: handed to the kernel
        self.phases: dict[str, float] | None = None  # python: where the time went (ms)
        self.proc: subprocess.Popen | None = None  # shell
        self.pipes: dict[int, Capture] = {}


class GetTransfer:
    def __init__(self, request_id: int, fd: int, path: str):
        self.id = request_id
        self.fd = fd
        self.path = path
        self.sent = 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class PutTransfer:
    def __init__(self, request_id: int, upload: files.Upload | None):
        self.id = request_id
        self.upload = upload
        self.error: files.FileOpError | None = None

    def close(self) -> None:
        if self.upload is not None:
            self.upload.abort()
            self.upload = None


def json_bytes(message: dict) -> bytes:
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode()


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# --- the agent -------------------------------------------------------------------------------
class Agent:
    def __init__(
        self,
        channel: Channel,
        data_dir: str,
        user: str | None,
        python: str,
        state_dir: str,
        system: bool,
        interrupt_grace: float = protocol.INTERRUPT_GRACE_S,
    ):
        self.channel = channel
        channel.agent = self
        self.python = python
        self.system = system
        # Where `reseed` records the identity the host gave this VM (readable by user code).
        self.identity_file = IDENTITY_FILE if system else os.path.join(state_dir, "identity")
        self.interrupt_grace = interrupt_grace
        self.started = time.monotonic()
        self.stopping = False
        self.reader = FrameReader()
        self.outbox = Outbox()
        self.kernel: Kernel | None = None
        self.generation = 0
        self.kernel_restarts = 0
        self.start_failures = 0
        self.kernel_start_at: float | None = None
        self.execution: Execution | None = None
        self.transfer: GetTransfer | PutTransfer | None = None
        self.exec_seq = 0
        self.state_lost = False  # a used kernel died between executions: tell the next one
        self._packages: dict[str, str] | None = None
        self.sigchld = False
        self.poller = select.poll()
        self.polled: dict[int, int] = {}

        uid = gid = None
        self.drop_privileges: dict[str, Any] = {}
        home = os.path.realpath(data_dir)
        self.user_name = user or pwd.getpwuid(os.getuid()).pw_name
        if user is not None:
            pw = pwd.getpwnam(user)
            uid, gid = pw.pw_uid, pw.pw_gid
            self.drop_privileges = {"user": uid, "group": gid, "extra_groups": []}
            os.setgroups([])
        self.data_dir = files.DataDir(data_dir, uid, gid)
        for sub in ("mpl", "ipython", "cache"):
            path = os.path.join(state_dir, sub)
            os.makedirs(path, exist_ok=True)
            if uid is not None:
                os.chown(state_dir, uid, gid)
                os.chown(path, uid, gid)
        self.user_env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": home,
            "USER": self.user_name,
            "LOGNAME": self.user_name,
            "SHELL": "/bin/bash",
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "TERM": "dumb",
            "PYTHONIOENCODING": "utf-8",
            "PYTHONDONTWRITEBYTECODE": "1",
            "MPLBACKEND": "module://shoal_mpl_backend",
            "MPLCONFIGDIR": os.path.join(state_dir, "mpl"),
            "IPYTHONDIR": os.path.join(state_dir, "ipython"),
            "TMPDIR": "/tmp",
            "XDG_CACHE_HOME": os.path.join(state_dir, "cache"),
        }
        # Set up for us by the guest's init: the prepared matplotlib font cache, OpenBLAS's CPU.
        for name in INHERITED_ENV:
            if os.environ.get(name):
                self.user_env[name] = os.environ[name]
        if os.path.dirname(python) not in ("/usr/bin", "/bin", "/usr/local/bin"):
            self.user_env["PATH"] = os.path.dirname(python) + ":" + self.user_env["PATH"]

        # Signals arrive as bytes on a pipe so they wake poll(); the handlers do nothing else.
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        for sig in (signal.SIGCHLD, signal.SIGIO):
            signal.signal(sig, lambda s, f: None)
        if os.getpid() != 1:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, self._stop_signal)

    def _stop_signal(self, signum, frame) -> None:
        self.stopping = True

    # --- the loop -------------------------------------------------------------------------
    def run(self) -> None:
        self.start_kernel()
        self.channel.start()
        while not self.stopping:
            self._sync_poll()
            timeout = self._next_timeout()
            events = self.poller.poll(None if timeout is None else max(0, int(timeout * 1000) + 1))
            for fd, ev in events:
                self._dispatch(fd, ev)
            if self.sigchld:
                self.sigchld = False
                self._reap()
            self._timers()
            self.channel.recheck()
            self._pump()
        self.shutdown()

    def shutdown(self) -> None:
        if self.kernel is not None:
            self.kernel.kill("agent exiting")
        ex = self.execution
        if ex is not None and ex.proc is not None:
            self._killpg(ex.proc.pid, signal.SIGKILL)
        if self.transfer is not None:
            self.transfer.close()

    def _desired(self) -> dict[int, int]:
        want: dict[int, int] = {self.wake_r: select.POLLIN}
        ch = self.channel
        for fd, ev in ch.watch():
            want[fd] = ev
        if ch.fd is not None:
            want[ch.fd] = select.POLLIN | (select.POLLOUT if self.outbox.size else 0)
        k = self.kernel
        if k is not None:
            if k.ctrl_fd is not None:
                want[k.ctrl_fd] = select.POLLIN | (select.POLLOUT if k.outbox.size else 0)
            for fd in (k.stdout_fd, k.stderr_fd):
                if fd is not None:
                    want[fd] = select.POLLIN
        ex = self.execution
        if ex is not None:
            for fd in ex.pipes:
                want[fd] = select.POLLIN
        return want

    def _sync_poll(self) -> None:
        want = self._desired()
        polled = self.polled
        if want == polled:
            return
        for fd in list(polled):
            if fd not in want:
                self.poller.unregister(fd)
                del polled[fd]
        for fd, ev in want.items():
            if polled.get(fd) != ev:
                self.poller.register(fd, ev)
                polled[fd] = ev

    def _next_timeout(self) -> float | None:
        now = time.monotonic()
        times = []
        ex = self.execution
        if ex is not None:
            if ex.interrupt_reason is None:
                times.append(ex.deadline)
            for t in (ex.kill_at, ex.abandon_at):
                if t is not None:
                    times.append(t)
        if self.kernel_start_at is not None:
            times.append(self.kernel_start_at)
        if self.kernel is not None and self.kernel.kill_at is not None:
            times.append(self.kernel.kill_at)
        wait = min(times) - now if times else None
        recheck = self.channel.recheck_after()
        if recheck is not None:
            wait = recheck if wait is None else min(wait, recheck)
        return wait

    def _dispatch(self, fd: int, ev: int) -> None:
        if fd == self.wake_r:
            try:
                data = os.read(self.wake_r, 512)
            except BlockingIOError:
                return
            if signal.SIGCHLD in data:
                self.sigchld = True
            return
        ch = self.channel
        if fd == ch.fd:
            self._channel_event(ev)
            return
        if any(fd == w for w, _ in ch.watch()):
            ch.on_event(fd)
            return
        k = self.kernel
        if k is not None:
            if fd == k.ctrl_fd:
                self._kernel_ctrl_event(k, ev)
                return
            if fd == k.stdout_fd or fd == k.stderr_fd:
                attr = "stdout_fd" if fd == k.stdout_fd else "stderr_fd"
                if not read_available(fd, lambda data: self._kernel_output(k, attr, data)):
                    os.close(fd)
                    setattr(k, attr, None)
                return
        ex = self.execution
        if ex is not None and fd in ex.pipes and not read_available(fd, ex.pipes[fd].feed):
            os.close(fd)
            del ex.pipes[fd]

    # --- host channel ---------------------------------------------------------------------
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
        self.outbox.push(protocol.HEADER.pack(protocol.MAGIC, len(body), len(blob)) + body + blob)
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

    # --- requests -------------------------------------------------------------------------
    def _handle(self, message: dict, blob: bytes) -> None:
        rid = message.get("id")
        if not isinstance(rid, int) or isinstance(rid, bool):
            echo = rid if isinstance(rid, str) else None
            self.error(echo, protocol.E_INVALID, "id must be an integer")
            return
        op = message.get("op")
        if op == protocol.OP_CHUNK:
            self._chunk(rid, message, blob)
            return
        handler = self.HANDLERS.get(op) if isinstance(op, str) else None
        if handler is None:
            self.error(rid, protocol.E_UNKNOWN_OP, f"unknown op {op!r}")
            return
        if op not in ALWAYS_ANSWERED and (self.execution is not None or self.transfer is not None):
            what = "an execution" if self.execution is not None else "a file transfer"
            self.error(rid, protocol.E_BUSY, f"{what} is in progress")
            return
        try:
            handler(self, rid, message)
        except BadRequest as exc:
            self.error(rid, protocol.E_INVALID, str(exc))
        except files.FileOpError as exc:
            self.error(rid, exc.code, exc.message)
        except Exception as exc:
            log.exception("request %s (%s) failed", rid, op)
            self.error(rid, protocol.E_INTERNAL, f"{type(exc).__name__}: {exc}")

    def op_hello(self, rid: int, message: dict) -> None:
        k = self.kernel
        fields: dict[str, Any] = {
            "agent_version": AGENT_VERSION,
            "protocol_version": protocol.PROTOCOL_VERSION,
            "python_version": (k.python_version if k is not None else "")
            or ".".join(map(str, sys.version_info[:3])),
            "kernel": self._kernel_state(),
            "kernel_pid": k.pid if k is not None else None,
            "kernel_restarts": self.kernel_restarts,
            "busy": self.execution is not None or self.transfer is not None,
            "user": self.user_name,
            "data_dir": protocol.DATA_DIR,
            "data_disk_error": self._data_disk_error(),
            "uptime_s": round(time.monotonic() - self.started, 3),
        }
        if message.get("packages", True):
            fields["packages"] = self.packages()
        self.answer(rid, **fields)

    @staticmethod
    def _data_disk_error() -> str | None:
        """What init said about the data disk when it could not mount it, or None."""
        try:
            with open(DATA_DISK_ERROR_FILE, errors="replace") as f:
                return f.read(4096).strip() or None
        except OSError:
            return None

    def packages(self) -> dict[str, str]:
        """name -> version of the kernel's interpreter; computed on first use, then cached."""
        if self._packages is None:
            if os.path.realpath(self.python) == os.path.realpath(sys.executable):
                found = list_packages()
            else:  # a different interpreter (host tests): ask it, once
                out = subprocess.run(
                    [self.python, "-c", "import supervisor; supervisor.print_packages()"],
                    cwd=HERE,
                    capture_output=True,
                    timeout=60,
                    env={"PYTHONPATH": HERE, "PATH": self.user_env["PATH"]},
                )
                found = json.loads(out.stdout or b"{}")
            self._packages = found
        return self._packages

    def _kernel_state(self) -> str:
        k = self.kernel
        if k is None:
            return "down"
        return "ready" if k.ready else "starting"

    def op_ping(self, rid: int, message: dict) -> None:
        self.answer(
            rid,
            busy=self.execution is not None or self.transfer is not None,
            kernel=self._kernel_state(),
        )

    def op_prepare_snapshot(self, rid: int, message: dict) -> None:
        """Before the host saves this VM as a template: write dirty pages out and drop the page
        cache, which every restored clone would otherwise carry (measured: ~5% of a clone's
        resident memory)."""
        if self.execution is not None or self.transfer is not None:
            self.error(rid, protocol.E_BUSY, "an execution or transfer is running")
            return
        os.sync()
        dropped = False
        if self.system:
            try:
                with open("/proc/sys/vm/drop_caches", "w") as f:
                    f.write("3")
                dropped = True
            except OSError:
                pass
        self.answer(rid, dropped=dropped)

    def op_interrupt(self, rid: int, message: dict) -> None:
        ex = self.execution
        t = self.transfer
        if ex is not None:
            self._interrupt(ex, protocol.STATUS_INTERRUPTED)
            self.answer(rid, interrupted=True)
        elif isinstance(t, GetTransfer | PutTransfer):
            t.close()  # an upload's temporary file is removed: nothing half-written remains
            self.transfer = None
            op = "file_get" if isinstance(t, GetTransfer) else "file_put"
            self.error(t.id, protocol.E_CANCELLED, f"{op} cancelled by an interrupt")
            self.answer(rid, interrupted=True)
        else:
            self.answer(rid, interrupted=False)

    def op_reseed(self, rid: int, message: dict) -> None:
        time_ns = message.get("time_ns")
        if time_ns is not None and (not isinstance(time_ns, int) or isinstance(time_ns, bool)):
            raise BadRequest("time_ns must be an integer")
        try:
            entropy = base64.b64decode(message.get("entropy", ""), validate=True)
        except (TypeError, ValueError):
            raise BadRequest("entropy must be base64") from None
        if not 16 <= len(entropy) <= 4096:
            raise BadRequest("entropy must be 16 to 4096 bytes")
        notes: dict[str, str] = {}
        if time_ns is None:
            notes["clock"] = "unchanged: no time_ns"
        elif not self.system:
            notes["clock"] = "skipped: system changes disabled (--no-system)"
        else:
            try:
                time.clock_settime_ns(time.CLOCK_REALTIME, time_ns)
                notes["clock"] = "set"
            except OSError as exc:
                notes["clock"] = f"skipped: {exc.strerror or exc}"
        notes["entropy"] = self._mix_entropy(entropy)
        identity = message.get("identity")
        if identity is not None:
            if not isinstance(identity, str) or not IDENTITY.match(identity):
                raise BadRequest("identity must be 1-128 characters: letters, digits, _ . -")
            notes["identity"] = self._record_identity(identity)
        seed = hashlib.sha512(entropy + os.urandom(32) + str(time_ns).encode()).digest()
        k = self.kernel
        if k is not None:
            k.send({"op": "reseed", "seed": base64.b64encode(seed).decode()})
            notes["kernel"] = "reseeded" if k.ready else "reseeded (queued: kernel starting)"
        else:
            notes["kernel"] = "none running (a new one seeds itself from the reseeded pool)"
        self.answer(rid, **notes)

    def _record_identity(self, identity: str) -> str:
        try:
            os.makedirs(os.path.dirname(self.identity_file), exist_ok=True)
            tmp = self.identity_file + ".tmp"
            with open(tmp, "w") as f:
                f.write(identity)
            os.chmod(tmp, 0o444)
            os.replace(tmp, self.identity_file)
            return "recorded"
        except OSError as exc:
            return f"not recorded: {exc.strerror or exc}"

    def _mix_entropy(self, entropy: bytes) -> str:
        if self.system:
            try:
                with open("/dev/urandom", "wb", buffering=0) as f:
                    info = struct.pack("ii", len(entropy) * 8, len(entropy)) + entropy
                    fcntl.ioctl(f.fileno(), RNDADDENTROPY, info)
                    fcntl.ioctl(f.fileno(), RNDRESEEDCRNG)
                return "credited and crng reseeded"
            except OSError:
                pass
        try:
            with open("/dev/urandom", "wb", buffering=0) as f:
                f.write(entropy)
            return "mixed into the pool (not credited)"
        except OSError as exc:
            return f"skipped: {exc.strerror or exc}"

    # --- execute --------------------------------------------------------------------------
    def op_execute(self, rid: int, message: dict) -> None:
        code = message.get("code")
        if not isinstance(code, str):
            raise BadRequest("code must be a string")
        if len(code) > protocol.MAX_CODE_BYTES or len(code.encode()) > protocol.MAX_CODE_BYTES:
            raise BadRequest(f"code is over {protocol.MAX_CODE_BYTES} bytes")
        language = message.get("language", "python")
        if language not in LANGUAGES:
            raise BadRequest(f"language must be one of {sorted(LANGUAGES)}")
        timeout_s = message.get("timeout_s", 60)
        if not _number(timeout_s) or not 0 < timeout_s <= MAX_TIMEOUT_S:
            raise BadRequest(f"timeout_s must be a number in (0, {MAX_TIMEOUT_S:g}]")
        limit = message.get("max_output", protocol.DEFAULT_MAX_OUTPUT)
        if not isinstance(limit, int) or isinstance(limit, bool):
            raise BadRequest("max_output must be an integer")
        if not 0 <= limit <= protocol.MAX_OUTPUT_CAP:
            raise BadRequest(f"max_output must be between 0 and {protocol.MAX_OUTPUT_CAP}")
        ex = Execution(rid, language, code, float(timeout_s), limit)
        self.execution = ex
        if language == "shell":
            self._start_shell(ex)
        else:
            self._send_to_kernel()

    def _send_to_kernel(self) -> None:
        ex = self.execution
        k = self.kernel
        if ex is None or ex.language != "python" or ex.kernel is not None:
            return
        if k is None or not k.ready or k.killed or k.retiring:
            return  # sent when the kernel says ready (or its successor does)
        self.exec_seq += 1
        ex.seq = self.exec_seq
        ex.kernel = k
        k.used = True
        ex.sent_at = time.monotonic()  # before: on one vCPU the kernel may run the cell at once
        k.send(
            {
                "op": "execute",
                "id": ex.seq,
                "code": ex.code,
                "max_rich": protocol.MAX_RICH_OUTPUT_BYTES,
            }
        )

    def _interrupt(self, ex: Execution, reason: str) -> None:
        if ex.interrupt_reason is not None:
            return
        ex.interrupt_reason = reason
        now = time.monotonic()
        if ex.language == "shell":
            if ex.proc is not None:
                if reason == protocol.STATUS_TIMED_OUT:
                    self._killpg(ex.proc.pid, signal.SIGKILL)
                    ex.abandon_at = now + REAP_GRACE_S
                else:
                    self._killpg(ex.proc.pid, signal.SIGINT)
                    ex.kill_at = now + self.interrupt_grace
            return
        if ex.kernel is None:
            what = "timed out" if reason == protocol.STATUS_TIMED_OUT else "was interrupted"
            self._finish(
                ex,
                status=reason,
                error={
                    "name": "InterpreterNotReady",
                    "value": f"the execution {what} while the interpreter was still starting",
                    "traceback": "",
                },
            )
            return
        ex.kernel.interrupt(ex.seq)
        ex.kill_at = now + self.interrupt_grace

    def _timers(self) -> None:
        now = time.monotonic()
        ex = self.execution
        if ex is not None:
            if ex.interrupt_reason is None and now >= ex.deadline:
                self._interrupt(ex, protocol.STATUS_TIMED_OUT)
            if ex.kill_at is not None and now >= ex.kill_at:
                ex.kill_at = None
                ex.abandon_at = now + REAP_GRACE_S
                if ex.language == "shell":
                    if ex.proc is not None:
                        self._killpg(ex.proc.pid, signal.SIGKILL)
                elif ex.kernel is not None:
                    ex.kernel.kill(f"did not stop within {self.interrupt_grace:g}s of SIGINT")
            if ex.abandon_at is not None and now >= ex.abandon_at and self.execution is ex:
                log.error("process of execution %s not reaped after SIGKILL", ex.id)
                if ex.language == "python" and self.kernel is ex.kernel and self.kernel:
                    self._kernel_gone(self.kernel, "did not exit after SIGKILL")
                else:
                    self._finish(ex, status=ex.interrupt_reason or protocol.STATUS_ERROR)
        k = self.kernel
        if k is not None and k.kill_at is not None and now >= k.kill_at:
            k.kill_at = None
            k.kill("closed its control socket")
        if self.kernel_start_at is not None and now >= self.kernel_start_at:
            self.kernel_start_at = None
            self.start_kernel()

    def _finish(
        self,
        ex: Execution,
        status: str,
        result: Any = None,
        outputs: list | None = None,
        outputs_truncated: bool = False,
        error: dict | None = None,
        exit_code: int | None = None,
        restarted: bool = False,
        execution_count: int | None = None,
    ) -> None:
        if self.execution is not ex:
            return
        self.execution = None
        for fd in list(ex.pipes):
            read_available(fd, ex.pipes[fd].feed)
            os.close(fd)
        ex.pipes.clear()
        answer = {
            "status": status,
            "stdout": ex.stdout.text(),
            "stderr": ex.stderr.text(),
            "stdout_truncated": ex.stdout.truncated,
            "stderr_truncated": ex.stderr.truncated,
            "result": result,
            "outputs": outputs or [],
            "outputs_truncated": outputs_truncated,
            "error": error,
            "exit_code": exit_code,
            "interpreter_restarted": restarted,
            "execution_count": execution_count,
            "duration_ms": round((time.monotonic() - ex.started) * 1000, 3),
            "phases_ms": ex.phases,
            "id": ex.id,
            "ok": True,
        }
        body = json_bytes(answer)
        if len(body) > protocol.MAX_JSON_FROM_GUEST:
            answer.update(result=None, outputs=[], outputs_truncated=True)
            body = json_bytes(answer)
        self.send_body(body)

    # --- kernel supervision ---------------------------------------------------------------
    def start_kernel(self) -> None:
        self.generation += 1
        try:
            self.kernel = Kernel(self, self.generation)
        except OSError as exc:
            log.error("cannot start the kernel: %s", exc)
            self.kernel = None
            self._kernel_start_failed(f"cannot start the interpreter: {exc}")
            return
        log.info("kernel %d started (generation %d)", self.kernel.pid, self.generation)

    def _kernel_start_failed(self, reason: str) -> None:
        self.start_failures += 1
        delay = min(30.0, 0.5 * 2 ** (self.start_failures - 1))
        self.kernel_start_at = time.monotonic() + delay
        ex = self.execution
        if (
            ex is not None
            and ex.language == "python"
            and ex.kernel is None
            and self.start_failures >= KERNEL_START_FAILURES
        ):
            self._finish(
                ex,
                status=protocol.STATUS_ERROR,
                error={"name": "InterpreterStartFailed", "value": reason, "traceback": ""},
            )

    def _kernel_output(self, k: Kernel, attr: str, data: bytes) -> None:
        ex = self.execution
        if ex is not None and ex.kernel is k:
            (ex.stdout if attr == "stdout_fd" else ex.stderr).feed(data)
        elif attr == "stderr_fd":
            tail = k.stderr_tail
            tail += data
            del tail[: max(0, len(tail) - STDERR_TAIL)]

    def _kernel_ctrl_event(self, k: Kernel, ev: int) -> None:
        if ev & select.POLLOUT:
            k.flush()
        if not ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
            return
        eof = not read_available(k.ctrl_fd, k.inbuf.extend, max_reads=256)
        messages = take_messages(k.inbuf, KERNEL_MAX_MESSAGE)
        if messages is None:
            k.kill("broke the control protocol")
            messages = []
        for message in messages:
            if self.kernel is not k:
                return
            self._kernel_message(k, message)
        if eof and self.kernel is k and k.ctrl_fd is not None:
            # Usually the process is exiting (its exit status comes with SIGCHLD); if it only
            # closed the socket, it cannot be talked to any more: kill it soon.
            k.ctrl.close()
            k.ctrl_fd = None
            k.kill_at = time.monotonic() + CTRL_EOF_KILL_S

    def _kernel_message(self, k: Kernel, message: dict) -> None:
        op = message.get("op")
        if op == "ready":
            k.ready = True
            version = message.get("python")
            k.python_version = version if isinstance(version, str) else ""
            self.start_failures = 0
            log.info("kernel %d ready (%.2fs)", k.pid, time.monotonic() - k.started)
            self._send_to_kernel()
            return
        if op != "done":
            return
        ex = self.execution
        if ex is None or ex.kernel is not k or message.get("id") != ex.seq:
            return
        # Drain what the cell printed: it was written before the kernel sent "done".
        pipes = {
            fd: attr for attr in ("stdout_fd", "stderr_fd") if (fd := getattr(k, attr)) is not None
        }
        for fd in readable(list(pipes)):
            read_available(fd, lambda data, a=pipes[fd]: self._kernel_output(k, a, data))
        result, outputs, error, bad = self._check_done(message)
        status = message.get("status")
        if status not in (protocol.STATUS_OK, protocol.STATUS_ERROR) or bad:
            status = protocol.STATUS_ERROR
        if ex.interrupt_reason is not None:
            status = ex.interrupt_reason
        if message.get("exiting") is True:
            k.retiring = True
            k.kill_at = time.monotonic() + CTRL_EOF_KILL_S
        ex.phases = self._phases(ex, message.get("kernel_at"))
        count = message.get("execution_count")
        restarted, self.state_lost = self.state_lost, False
        self._finish(
            ex,
            status=status,
            result=result,
            outputs=outputs,
            outputs_truncated=message.get("outputs_truncated") is True,
            error=error,
            execution_count=count if isinstance(count, int) else None,
            restarted=restarted,
        )

    @staticmethod
    def _phases(ex: Execution, kernel_at: Any) -> dict[str, float] | None:
        """Where an execution's time went, from the kernel's own stamps (same clock as ours):
        handing it over, the kernel's work, and the way back (reported, not trusted)."""
        if ex.sent_at is None or not isinstance(kernel_at, list) or len(kernel_at) != 2:
            return None
        received, replied = kernel_at
        if not (_number(received) and _number(replied)):
            return None
        now = time.monotonic()
        return {
            "agent_in": round((ex.sent_at - ex.started) * 1000, 3),
            "to_kernel": round((received - ex.sent_at) * 1000, 3),
            "kernel": round((replied - received) * 1000, 3),
            "from_kernel": round((now - replied) * 1000, 3),
        }

    @staticmethod
    def _check_done(message: dict) -> tuple[Any, list, dict | None, bool]:
        """Shallow checks on what the (untrusted) kernel reported."""

        def bundle_ok(b: Any) -> bool:
            return isinstance(b, dict) and all(isinstance(k, str) for k in b)

        result = message.get("result")
        outputs = message.get("outputs")
        error = message.get("error")
        bad = False
        if result is not None and not bundle_ok(result):
            result, bad = None, True
        if not isinstance(outputs, list) or not all(
            isinstance(o, dict) and bundle_ok(o.get("data")) for o in outputs
        ):
            outputs, bad = [], True
        if error is not None and not (
            isinstance(error, dict)
            and all(isinstance(error.get(f), str) for f in ("name", "value", "traceback"))
        ):
            error = None
            bad = True
        if bad and error is None:
            error = {
                "name": "InternalError",
                "value": "the interpreter reported a malformed result",
                "traceback": "",
            }
        return result, outputs, error, bad

    def _kernel_gone(self, k: Kernel, how: str) -> None:
        """The kernel process exited (or will not die): answer its execution, start another."""
        if self.kernel is not k:
            return
        ex = self.execution
        bound = ex is not None and ex.kernel is k
        k.kill_group()
        k.close_fds(sink=(lambda a, d: self._kernel_output(k, a, d)) if bound else None)
        self.kernel = None
        self.kernel_restarts += 1
        was_ready = k.ready
        tail = k.stderr_tail.decode("utf-8", "replace").strip()
        log.warning("kernel %d %s", k.pid, how)
        if not bound and k.used:
            self.state_lost = True
        if bound:
            if ex.interrupt_reason is not None and ex.abandon_at is not None:
                value = (
                    f"The execution did not stop within {self.interrupt_grace:g}s of the "
                    "interrupt, so the Python interpreter was killed and restarted: all state "
                    "(variables, imports, definitions) was lost."
                )
            else:
                value = (
                    f"The Python interpreter {how} and was restarted: all state (variables, "
                    "imports, definitions) was lost."
                )
            self.state_lost = False
            self._finish(
                ex,
                status=ex.interrupt_reason or protocol.STATUS_ERROR,
                error={"name": "InterpreterRestarted", "value": value, "traceback": ""},
                restarted=True,
            )
        if was_ready:
            self.start_kernel()
        else:
            self._kernel_start_failed(f"the interpreter {how} while starting: {tail[-2000:]}")

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            k = self.kernel
            ex = self.execution
            if k is not None and pid == k.pid:
                k.proc.returncode = code
                how = describe_exit(code)
                if k.killed:
                    how = f"was killed by the agent ({k.kill_reason})"
                self._kernel_gone(k, how)
            elif ex is not None and ex.proc is not None and pid == ex.proc.pid:
                ex.proc.returncode = code
                self._shell_exited(ex, code)

    # --- shell ----------------------------------------------------------------------------
    def _start_shell(self, ex: Execution) -> None:
        try:
            proc = subprocess.Popen(
                ["/bin/bash", "-c", ex.code],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=self.data_dir.root,
                env=self.user_env,
                process_group=0,
                **self.drop_privileges,
            )
        except OSError as exc:
            self._finish(
                ex,
                status=protocol.STATUS_ERROR,
                error={"name": "ShellStartFailed", "value": str(exc), "traceback": ""},
            )
            return
        ex.proc = proc
        for stream, capture in ((proc.stdout, ex.stdout), (proc.stderr, ex.stderr)):
            fd = os.dup(stream.fileno())
            stream.close()
            set_nonblocking(fd)
            ex.pipes[fd] = capture

    def _shell_exited(self, ex: Execution, code: int) -> None:
        exit_code = code if code >= 0 else 128 - code
        status = protocol.STATUS_OK if code == 0 else protocol.STATUS_ERROR
        error = None
        if code != 0:
            how = f"exit code {code}" if code > 0 else f"signal {-code}"
            error = {"name": "ShellError", "value": f"command ended with {how}", "traceback": ""}
        if ex.interrupt_reason is not None:
            status = ex.interrupt_reason
        self._finish(ex, status=status, error=error, exit_code=exit_code)

    @staticmethod
    def _killpg(pgid: int, sig: int) -> None:
        with contextlib.suppress(OSError):
            os.killpg(pgid, sig)

    # --- files ----------------------------------------------------------------------------
    def op_file_stat(self, rid: int, message: dict) -> None:
        self.answer(rid, **self.data_dir.stat(message.get("path", "")))

    def op_file_list(self, rid: int, message: dict) -> None:
        recursive = message.get("recursive", False)
        if not isinstance(recursive, bool):
            raise BadRequest("recursive must be a boolean")
        self.answer(rid, **self.data_dir.list(message.get("path", ""), recursive))

    def op_file_delete(self, rid: int, message: dict) -> None:
        recursive = message.get("recursive", False)
        if not isinstance(recursive, bool):
            raise BadRequest("recursive must be a boolean")
        self.answer(rid, **self.data_dir.delete(message.get("path"), recursive))

    def op_file_get(self, rid: int, message: dict) -> None:
        fd, info = self.data_dir.open_read(message.get("path"))
        self.transfer = GetTransfer(rid, fd, info["path"])
        self.answer(rid, **info)
        self._pump()

    def _pump(self) -> None:
        """Read the next chunks of a file_get while the host keeps up."""
        t = self.transfer
        if not isinstance(t, GetTransfer):
            return
        while self.transfer is t and self.outbox.size < OUT_HIGH_WATER:
            if self.channel.fd is None:
                return
            try:
                data = os.read(t.fd, protocol.FILE_CHUNK)
            except OSError as exc:
                t.close()
                self.transfer = None
                err = files.os_error(exc, t.path)
                self.error(t.id, err.code, err.message)
                return
            if not data:
                t.close()
                self.transfer = None
                self.send(
                    {"id": t.id, "ok": True, "op": protocol.OP_CHUNK, "eof": True, "size": t.sent}
                )
                return
            t.sent += len(data)
            self.send({"id": t.id, "op": protocol.OP_CHUNK}, data)

    def op_file_put(self, rid: int, message: dict) -> None:
        upload = self.data_dir.open_write(message.get("path"))
        self.transfer = PutTransfer(rid, upload)
        self.answer(rid, ready=True)

    def _chunk(self, rid: int, message: dict, blob: bytes) -> None:
        t = self.transfer
        if not isinstance(t, PutTransfer) or t.id != rid:
            self.error(rid, protocol.E_INVALID, "chunk for no file_put in progress")
            return
        if t.upload is not None and t.error is None:
            try:
                t.upload.write(blob)
            except files.FileOpError as exc:
                t.error = exc
                t.upload = None  # write() already removed the partial file
                self.error(rid, exc.code, exc.message)  # the host may stop early
        if message.get("eof") is not True:
            return
        self.transfer = None
        if t.error is not None:
            return  # already answered
        try:
            info = t.upload.commit()
        except files.FileOpError as exc:
            self.error(rid, exc.code, exc.message)
            return
        finally:
            t.upload = None
        self.answer(rid, **info)

    HANDLERS = {
        protocol.OP_HELLO: op_hello,
        protocol.OP_PING: op_ping,
        protocol.OP_PREPARE_SNAPSHOT: op_prepare_snapshot,
        protocol.OP_INTERRUPT: op_interrupt,
        protocol.OP_RESEED: op_reseed,
        protocol.OP_EXECUTE: op_execute,
        protocol.OP_FILE_PUT: op_file_put,
        protocol.OP_FILE_GET: op_file_get,
        protocol.OP_FILE_LIST: op_file_list,
        protocol.OP_FILE_STAT: op_file_stat,
        protocol.OP_FILE_DELETE: op_file_delete,
    }


def list_packages() -> dict[str, str]:
    found: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if isinstance(name, str) and name not in found:
            found[name] = str(dist.version)
    return dict(sorted(found.items(), key=lambda kv: kv[0].lower()))


def print_packages() -> None:
    print(json.dumps(list_packages()))


def describe_exit(code: int) -> str:
    if code >= 0:
        return f"exited with code {code}"
    sig = -code
    try:
        name = signal.Signals(sig).name
    except ValueError:
        name = f"signal {sig}"
    hint = " (possibly out of memory)" if sig == signal.SIGKILL else ""
    return f"was killed by {name}{hint}"


# --- entry point -----------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = p.add_mutually_exclusive_group()
    where.add_argument("--fd", type=int, help="serve an inherited connected socket (tests)")
    where.add_argument("--socket", help="listen on this unix socket path, one host at a time")
    where.add_argument("--port", help="virtio-serial device (default: found by channel name)")
    p.add_argument("--data-dir", default=protocol.DATA_DIR)
    p.add_argument("--user", default="sandbox", help="run user code as NAME; 'none' keeps ours")
    p.add_argument("--python", default=sys.executable, help="interpreter for the kernel")
    p.add_argument("--state-dir", default="/tmp/shoal", help="MPLCONFIGDIR, IPYTHONDIR live here")
    p.add_argument(
        "--system",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="let reseed set the clock and credit entropy (default: only in the guest)",
    )
    p.add_argument("--interrupt-grace", type=float, default=protocol.INTERRUPT_GRACE_S)
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="shoal-agent %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    os.umask(0o022)
    guest = args.fd is None and args.socket is None
    system = guest if args.system is None else args.system
    if args.fd is not None:
        channel: Channel = FdChannel(args.fd)
    elif args.socket is not None:
        channel = ListenChannel(args.socket)
    else:
        channel = None  # the virtio port, opened below
    user = None if args.user == "none" else args.user
    try:
        agent = Agent(
            channel or VirtioChannel(args.port or wait_for_port()),
            args.data_dir,
            user,
            os.path.abspath(args.python),  # the kernel starts in the data dir
            os.path.abspath(args.state_dir),
            system,
            args.interrupt_grace,
        )
        agent.run()
    except Exception:
        if not guest:
            raise
        # PID 1 must not exit (the guest kernel would panic): start over from a clean exec.
        log.exception("agent failed; re-executing")
        time.sleep(1)
        os.execv(sys.executable, [sys.executable, *sys.argv])


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
