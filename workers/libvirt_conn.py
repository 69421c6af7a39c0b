"""One libvirt connection per worker process, opened lazily and reopened when libvirtd restarts.

`connection()` returns this process's `LibvirtConnection`. It opens nothing until first used,
notices a fork (a child never reuses its parent's socket), and when a call fails because the
daemon went away (libvirtd restarted, RPC socket closed) it reopens the connection and retries
the call once. Every other libvirt error becomes a VMError whose message says what to do.
Running domains survive a libvirtd restart: libvirtd reattaches to their QEMU processes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import libvirt

from workers.vm_errors import LibvirtUnavailable, VMError

log = logging.getLogger("shoal.libvirt")

DEFAULT_URI = "qemu:///system"
# How long a call waits for libvirtd to answer again (it is restarting) before it fails.
RECONNECT_WAIT_S = 10.0
T = TypeVar("T")

# Errors that mean "the connection is dead", not "the operation failed".
_DEAD_DOMAINS = {libvirt.VIR_FROM_RPC, libvirt.VIR_FROM_REMOTE}
_DEAD_CODES = {libvirt.VIR_ERR_INVALID_CONN, libvirt.VIR_ERR_NO_CONNECT}

_START_HINT = (
    "start it the way `shoal up` does: `virtlogd -d`, then "
    "`unshare -m --propagation private sh -c 'mount --bind /dev/null /dev/kvm && "
    "exec libvirtd -d'` (see docs and host.md)"
)


def _silence(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; we raise them instead."""


libvirt.registerErrorHandler(_silence, None)


def is_dead_connection_error(exc: libvirt.libvirtError) -> bool:
    return exc.get_error_domain() in _DEAD_DOMAINS or exc.get_error_code() in _DEAD_CODES


def is_no_domain(exc: libvirt.libvirtError) -> bool:
    return exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN


def is_not_running(exc: libvirt.libvirtError) -> bool:
    return exc.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID


def explain(what: str, exc: libvirt.libvirtError) -> VMError:
    """Turn a libvirt error into a VMError with a message an operator can act on."""
    message = (exc.get_error_message() or str(exc)).strip()
    code = exc.get_error_code()
    hint = ""
    if "Permission denied" in message:
        hint = (
            " (QEMU runs under per-VM uids: every directory on the path to kernels, disks,"
            " sockets and logs must be o+x; keep them under /var/lib or /var/cache)"
        )
    elif "virtlogd" in message:
        hint = " (virtlogd is not running: start it with `virtlogd -d`)"
    elif "Failed to connect socket" in message or "libvirt-sock" in message:
        error: VMError = LibvirtUnavailable(
            f"{what}: libvirtd is not reachable: {message}; {_START_HINT}"
        )
        error.libvirt_code = code
        return error
    elif "does not match source" in message:
        hint = " (the save image's name/uuid differ from the XML: the template is inconsistent)"
    error = VMError(f"{what} failed: {message}{hint}")
    error.libvirt_code = code
    return error


class LibvirtConnection:
    """A lazily opened, self-healing connection. Thread-safe: libvirt connections are."""

    def __init__(self, uri: str = DEFAULT_URI) -> None:
        self.uri = uri
        self._lock = threading.Lock()
        self._conn: libvirt.virConnect | None = None
        self._pid = 0
        self.reconnects = 0
        self.last_error = ""

    def _open(self) -> libvirt.virConnect:
        try:
            conn = libvirt.open(self.uri)
        except libvirt.libvirtError as exc:
            self.last_error = exc.get_error_message() or str(exc)
            raise LibvirtUnavailable(
                f"cannot open {self.uri}: {self.last_error}; {_START_HINT}"
            ) from None
        self.last_error = ""
        return conn

    def get(self) -> libvirt.virConnect:
        """The open connection, (re)opened if there is none, it died, or we were forked."""
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                try:
                    if self._conn.isAlive():
                        return self._conn
                except libvirt.libvirtError:
                    pass
                self._drop()
                self.reconnects += 1
                log.warning("libvirt connection to %s was closed; reopening", self.uri)
            elif self._pid != os.getpid():
                self._conn = None  # the parent's socket: never use or close it here
            self._conn = self._open()
            self._pid = os.getpid()
            return self._conn

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()

    def reset(self, dead: libvirt.virConnect) -> None:
        """Forget `dead` (if it is still the current connection) so the next get() reopens."""
        with self._lock:
            if self._conn is dead:
                self._drop()
                self.reconnects += 1

    def call(
        self,
        what: str,
        fn: Callable[[libvirt.virConnect], T],
        retry: bool = True,
        wait_s: float = RECONNECT_WAIT_S,
    ) -> T:
        """Run fn(conn). A dead connection is reopened and fn retried once (if `retry`);
        other libvirt errors become VMError (its `libvirt_code` keeps libvirt's code). While
        libvirtd restarts (its socket is briefly gone) the call waits up to `wait_s` for it
        (when `retry`), before the call and before its retry."""
        wait_s = wait_s if retry else 0.0
        conn = self._get_waiting(wait_s)
        try:
            return fn(conn)
        except libvirt.libvirtError as exc:
            if not is_dead_connection_error(exc):
                raise explain(what, exc) from None
            log.warning(
                "libvirt connection lost during %s (%s); reopening", what, exc.get_error_message()
            )
            self.reset(conn)
            if not retry:
                raise LibvirtUnavailable(
                    f"{what}: the connection to libvirtd was lost: {exc.get_error_message()}"
                ) from None
        conn = self._get_waiting(wait_s)
        try:
            return fn(conn)
        except libvirt.libvirtError as exc:
            raise explain(what, exc) from None

    def _get_waiting(self, wait_s: float) -> libvirt.virConnect:
        """get(), trying again for up to `wait_s` while libvirtd cannot be reached."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return self.get()
            except LibvirtUnavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.25)

    def ping(self) -> tuple[bool, str]:
        """(ok, error) for /healthz: a cheap round trip to libvirtd."""
        try:
            # No waiting: the heartbeat asks, and must not stall while libvirtd restarts; a
            # connection that died is still reopened at once, so a restarted libvirtd is seen.
            version = self.call("libvirt version", lambda c: c.getLibVersion(), wait_s=0.0)
        except VMError as exc:
            return False, exc.message
        major, rest = divmod(version, 1_000_000)
        return True, f"libvirt {major}.{rest // 1000}.{rest % 1000}"

    def close(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                self._drop()
            self._conn = None


_connections: dict[str, LibvirtConnection] = {}
_connections_lock = threading.Lock()


def connection(uri: str = DEFAULT_URI) -> LibvirtConnection:
    """This process's connection to `uri` (created lazily; nothing is opened here)."""
    with _connections_lock:
        conn = _connections.get(uri)
        if conn is None:
            conn = _connections[uri] = LibvirtConnection(uri)
        return conn
