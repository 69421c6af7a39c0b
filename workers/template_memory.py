"""A template's guest memory, shared copy-on-write by its clones without any clone being able to
write it (the first slice of docs/performance.md, "Clones sharing their template's memory").

Why a sealed memfd. A clone maps the template's memory privately (`memory-backend-file`,
`share=off`): the pages it only reads stay the template's, shared by every clone; a page it
writes becomes its own. But QEMU 7.2 opens a memory file read-write even for a private mapping,
so a file the clone's uid may open would be a file an escaped QEMU could write into every other
clone's memory through. A memfd sealed with F_SEAL_WRITE, F_SEAL_GROW, F_SEAL_SHRINK and
F_SEAL_SEAL has no such hole: any process may hold it open read-write, yet the kernel refuses
every write(), every shared writable mapping, every hole punched and every size change, and the
seals can never be lifted; private mappings work. QEMU reaches it as `/proc/self/fd/N`.

How the fd gets there. libvirt starts QEMU as the VM's own uid and passes it no descriptor of
ours, so the VM's emulator is a small wrapper (workers/qemu_wrapper.py) that, still as that uid,
asks this broker for its memory over a unix socket. The broker answers only a uid it was told to
expect (SO_PEERCRED, the kernel's word for the peer), once, with the fd it was given for it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("shoal.vm")

# fcntl(2) constants (Linux), not exported by Python's fcntl module before 3.12.
F_ADD_SEALS = 1033
F_GET_SEALS = 1034
F_SEAL_SEAL, F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_WRITE = 0x1, 0x2, 0x4, 0x8
READ_ONLY_SEALS = F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE

ANSWER_TIMEOUT_S = 5.0
BACKLOG = 128
ACCEPT_RETRY_S = 0.1
REFUSAL_LOG_EVERY_S = 10.0
PEERCRED = struct.Struct("iII")  # pid, uid, gid: uids above 2**31 stay positive
COPY_CHUNK = 64 << 20


def writable_memfd(name: str, size: int) -> int:
    """A memfd of `size` bytes that may be sealed later (a template's memory while it is made)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    return fd


def seal_read_only(fd: int) -> None:
    """Seal `fd` against writes and size changes, for good. Fails (EBUSY) while any shared
    writable mapping of it exists: the template's QEMU must be gone first."""
    fcntl.fcntl(fd, F_ADD_SEALS, READ_ONLY_SEALS)


def is_sealed_read_only(fd: int) -> bool:
    return fcntl.fcntl(fd, F_GET_SEALS) & READ_ONLY_SEALS == READ_ONLY_SEALS


def copy_sparse(source: int, target: int, size: int) -> None:
    """Copy `size` bytes of `source` into `target` at the same offsets, data only: the guest's
    untouched memory is holes in both, costing neither disk nor shared memory."""
    position = 0
    while position < size:
        try:
            start = os.lseek(source, position, os.SEEK_DATA)
        except OSError:  # ENXIO: nothing but a hole up to the end
            break
        end = min(os.lseek(source, start, os.SEEK_HOLE), size)
        os.lseek(target, start, os.SEEK_SET)
        while start < end:
            sent = os.sendfile(target, source, start, min(COPY_CHUNK, end - start))
            if sent == 0:
                raise OSError(f"fd {source} shrank while it was copied")
            start += sent
        position = end
    os.ftruncate(target, size)


def sealed_copy(path: Path, name: str) -> int:
    """A sealed memfd holding `path`'s bytes (a template's memory file, root's 0600)."""
    with open(path, "rb") as source:
        size = os.fstat(source.fileno()).st_size
        fd = writable_memfd(name, 0)
        try:
            copy_sparse(source.fileno(), fd, size)
            seal_read_only(fd)
        except BaseException:
            os.close(fd)
            raise
    return fd


@dataclass(frozen=True)
class Grant:
    """What one expected uid gets: the fd, and whether QEMU maps it shared (a template being
    made) or private (a clone)."""

    fd: int
    shared: bool


class BrokerTaken(OSError):
    """Another process of this host already serves the broker's socket."""


class MemoryBroker:
    """Hands each expected VM uid its memory fd, once. A thread serving a unix socket that
    every VM uid may connect to (its directory is traversable, the socket 0666): a connection
    from a uid that is not expected gets a refusal and nothing else.

    `expect` takes a duplicate of the fd it is given and closes it once sent or forgotten, so
    the caller may close its own at any time. One process per socket: a flock on a sibling
    file (outside the VM directory: SHOAL_HOME/run for a worker), so a second process of the
    same host cannot take the socket over."""

    def __init__(self, socket_path: Path, lock_path: Path | None = None) -> None:
        self.socket_path = socket_path
        self.lock_path = lock_path or socket_path.with_name(socket_path.name + ".lock")
        self._grants: dict[int, Grant] = {}
        self._lock = threading.Lock()
        self._server: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._lock_fd = -1
        self._last_refusal_log = 0.0

    def start(self) -> None:
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise BrokerTaken(f"another process serves {self.socket_path}") from None
        self._lock_fd = lock_fd
        self.socket_path.unlink(missing_ok=True)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        server.bind(str(self.socket_path))
        os.chmod(self.socket_path, 0o666)
        server.listen(BACKLOG)
        self._server = server
        self._thread = threading.Thread(target=self._serve, name="memory-broker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            with contextlib.suppress(OSError):
                server.shutdown(socket.SHUT_RDWR)
            server.close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.socket_path.unlink(missing_ok=True)
        with self._lock:
            grants, self._grants = self._grants, {}
        for grant in grants.values():
            os.close(grant.fd)
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def serving(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def expect(self, uid: int, grant: Grant) -> None:
        """The next connection from `uid` gets `grant` (a duplicate of its fd)."""
        own = Grant(os.dup(grant.fd), grant.shared)
        with self._lock:
            old = self._grants.pop(uid, None)
            self._grants[uid] = own
        if old is not None:
            os.close(old.fd)

    def forget(self, uid: int) -> None:
        with self._lock:
            old = self._grants.pop(uid, None)
        if old is not None:
            os.close(old.fd)

    def _serve(self) -> None:
        while self._server is not None:
            try:
                conn, _ = self._server.accept()
            except OSError as exc:
                if self._server is None:
                    return
                log.warning("memory broker: accept failed (%s); going on", exc)
                time.sleep(ACCEPT_RETRY_S)
                continue
            with conn:
                try:
                    self._answer(conn)
                except OSError as exc:
                    log.warning("memory broker: a request failed: %s", exc)

    def _answer(self, conn: socket.socket) -> None:
        conn.settimeout(ANSWER_TIMEOUT_S)
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, PEERCRED.size)
        pid, uid, _gid = PEERCRED.unpack(creds)
        with self._lock:
            grant = self._grants.pop(uid, None)
        if grant is None:
            now = time.monotonic()
            if now - self._last_refusal_log > REFUSAL_LOG_EVERY_S:  # a flood fills no disk
                self._last_refusal_log = now
                log.warning("memory broker: uid %s (pid %s) asked, none expected", uid, pid)
            conn.sendall(json.dumps({"error": "no memory is expected for this uid"}).encode())
            return
        try:
            answer = json.dumps({"shared": grant.shared}).encode()
            socket.send_fds(conn, [answer], [grant.fd])
        finally:
            os.close(grant.fd)
