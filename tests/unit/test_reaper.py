"""The daemons' reaper (shoal/ops/reaper.py): an orphan below it (what libvirtd makes of every
QEMU) is reaped the moment it exits, not when PID 1 gets round to it, and the reaper leaves once
nothing is left below it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

# The command daemonizes a sleeper the way libvirtd daemonizes QEMU (its parent exits at once).
DAEMONIZE = "sleep 30 & echo $!"


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_an_orphan_below_the_reaper_is_reaped_at_once_and_the_reaper_then_leaves() -> None:
    reaper = subprocess.Popen(
        [sys.executable, "-m", "shoal.ops.reaper", "sh", "-c", DAEMONIZE],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    orphan = int(reaper.stdout.readline())
    time.sleep(0.2)  # its parent, sh, has exited: the sleeper is an orphan now
    status = Path(f"/proc/{orphan}/status").read_text()
    assert f"PPid:\t{reaper.pid}\n" in status  # adopted by the reaper, not by PID 1
    os.kill(orphan, signal.SIGTERM)
    started = time.monotonic()
    while not gone(orphan):
        assert time.monotonic() - started < 0.5, "the orphan lingered (a zombie)"
        time.sleep(0.005)
    assert reaper.wait(timeout=5) == 0


def test_without_a_command_it_says_how_to_use_it() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "shoal.ops.reaper"], capture_output=True, text=True, timeout=10
    )
    assert run.returncode == 2 and "usage:" in run.stderr
