"""Runs a daemon's start command as a child subreaper and reaps every orphan below it.

libvirtd daemonizes QEMU: each VM's process is orphaned at once and its exit is only noticed
when whoever adopts orphans reaps it, as libvirt's destroy polls (every 200 ms) until the pid is
gone. Where PID 1 reaps late or never (a container's init; this project's machines reap every
~2 s, measured), every destroy took ~1.8 s and a zombie lingered. Started through this module,
`libvirtd -d` and the QEMUs it starts are adopted here instead and reaped the moment they exit.
It lives as long as anything below it does. Standard library only.
"""

from __future__ import annotations

import ctypes
import os
import sys

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def reap_until_alone() -> None:
    """Reap every child and adopted orphan until none is left."""
    while True:
        try:
            os.wait()
        except ChildProcessError:
            return
        except InterruptedError:
            continue


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m shoal.ops.reaper COMMAND [ARG...]", file=sys.stderr)
        return 2
    become_subreaper()
    pid = os.fork()
    if pid == 0:
        try:
            os.execvp(argv[0], argv)
        finally:
            os._exit(127)
    reap_until_alone()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
