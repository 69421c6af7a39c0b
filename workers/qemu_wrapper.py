"""The emulator libvirt starts for a VM whose memory comes from its template
(workers/template_memory.py). It runs as the VM's own uid, before QEMU: it asks the host's memory
broker for the memory fd (the socket in SHOAL_MEMORY_SOCKET), points the guest RAM backend at it
(`/proc/self/fd/N`, shared or private as the broker says) and execs QEMU. Without
SHOAL_MEMORY_SOCKET (libvirt probing the emulator's capabilities, any other domain) it execs
QEMU unchanged.

Standard library only, run by the system Python with -I: it is copied to a root-owned path every
VM uid may execute, and nothing of the checkout or its virtualenv needs to be readable by them.
Any failure ends it with a message on stderr, which libvirt puts into its start error.
"""

from __future__ import annotations

import json
import os
import socket
import sys

QEMU = "/usr/bin/qemu-system-x86_64"
RAM_BACKEND_ID = "pc.ram"
ANSWER_MAX_BYTES = 256
TIMEOUT_S = 10.0


def rewrite_argv(argv: list[str], fd: int, shared: bool, incoming: bool) -> list[str]:
    """QEMU's arguments with the guest RAM backend (libvirt's JSON `-object` of id pc.ram)
    made a file backend on `fd`; with `incoming`, QEMU waits for a migration stream."""
    rewritten, found = [], False
    for arg in argv:
        if arg.startswith("{") and '"memory-backend-' in arg:
            backend = json.loads(arg)
            if backend.get("id") == RAM_BACKEND_ID:
                backend.update(
                    {"qom-type": "memory-backend-file", "mem-path": f"/proc/self/fd/{fd}"}
                )
                backend["share"] = shared
                arg, found = json.dumps(backend), True
        rewritten.append(arg)
    if not found:
        raise ValueError(f"no {RAM_BACKEND_ID} memory backend among QEMU's arguments")
    return [*rewritten, "-incoming", "defer"] if incoming else rewritten


def receive(socket_path: str) -> tuple[int, bool]:
    """The memory fd the broker holds for this process's uid, and whether to map it shared."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(TIMEOUT_S)
        conn.connect(socket_path)
        data, fds, _flags, _addr = socket.recv_fds(conn, ANSWER_MAX_BYTES, 1)
    answer = json.loads(data or b"{}")
    if not fds:
        raise RuntimeError(answer.get("error") or "the memory broker sent no fd")
    os.set_inheritable(fds[0], True)
    return fds[0], bool(answer.get("shared"))


def main(argv: list[str]) -> None:
    qemu = os.environ.get("SHOAL_QEMU", QEMU)
    socket_path = os.environ.get("SHOAL_MEMORY_SOCKET")
    if socket_path:
        try:
            fd, shared = receive(socket_path)
            argv = rewrite_argv(argv, fd, shared, bool(os.environ.get("SHOAL_MEMORY_INCOMING")))
        except (OSError, ValueError, RuntimeError) as exc:
            print(f"shoal qemu wrapper: no template memory: {exc}", file=sys.stderr)
            sys.exit(1)
    os.execv(qemu, [qemu, *argv])


if __name__ == "__main__":
    main(sys.argv[1:])
