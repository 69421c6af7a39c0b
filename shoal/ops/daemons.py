"""The host daemons Shoal needs but does not own: virtlogd and libvirtd.

Nothing starts them at boot on our machines (no systemd), so `shoal up` starts each one that is
not already running, and leaves them running at `shoal down`: other instances on the host may
use them. They are the host's, not an instance's: they start in their own session with a
clean environment, so nothing of the instance that happened to start them (SHOAL_HOME, its
Redis URL) lives on in them. Where the CPU has no hardware virtualization, libvirtd is started
in a private mount namespace with /dev/kvm hidden behind an unopenable device, or it re-probes
QEMU on every domain start (host.md: 56 s).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

LIBVIRT_URI = "qemu:///system"
NO_KVM = Path("/var/lib/shoal/.no-kvm")


def hardware_virtualization() -> bool:
    """True when the CPU advertises VT-x/AMD-V (the cheap test; workers/accel.py decides)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = " ".join(line for line in f if line.startswith("flags"))
    except OSError:
        return False
    return " vmx" in flags or " svm" in flags


def _running(name: str) -> bool:
    return subprocess.run(["pgrep", "-x", name], capture_output=True).returncode == 0


def libvirt_answers() -> bool:
    result = subprocess.run(
        ["virsh", "-c", LIBVIRT_URI, "version"], capture_output=True, timeout=30
    )
    return result.returncode == 0


def _daemon_env() -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "LANG": "C.UTF-8"}


def _start_daemon(argv: list[str]) -> None:
    subprocess.run(
        argv, check=True, env=_daemon_env(), start_new_session=True, stdin=subprocess.DEVNULL
    )


def _start_reaped(argv: list[str]) -> subprocess.Popen:
    """Start a daemon below a reaper of its own (shoal/ops/reaper.py), left running; the
    reaper ends only when nothing is left below it (the daemon failed to start, or stopped)."""
    return subprocess.Popen(
        [sys.executable, "-m", "shoal.ops.reaper", *argv],
        env=_daemon_env(), start_new_session=True, stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/",
    )  # fmt: skip


def ensure_virtlogd() -> str:
    if _running("virtlogd"):
        return "already running"
    _start_daemon(["virtlogd", "-d"])
    return "started"


def _no_kvm_device() -> Path:
    """A character device nobody may open, to mount over /dev/kvm in libvirtd's namespace.

    /dev/null would not do: libvirt-qemu can open it, so libvirt decides KVM "became usable"
    and re-probes QEMU on every domain start (about 30 s each, measured here)."""
    NO_KVM.parent.mkdir(parents=True, exist_ok=True)
    if not NO_KVM.is_char_device():
        NO_KVM.unlink(missing_ok=True)
        os.mknod(NO_KVM, 0o000 | stat.S_IFCHR, os.makedev(1, 3))
    NO_KVM.chmod(0o000)
    return NO_KVM


def ensure_libvirtd(timeout_s: float = 30.0) -> str:
    """Start libvirtd unless it runs; wait until it answers."""
    reaper: subprocess.Popen | None = None
    if _running("libvirtd"):
        state = "already running"
    else:
        # libvirtd and its QEMUs are reaped by a reaper of their own: a destroyed VM's
        # process is gone at once, whoever PID 1 is.
        if hardware_virtualization():
            reaper = _start_reaped(["libvirtd", "-d"])
            state = "started"
        else:
            hide_kvm = f"mount --bind {_no_kvm_device()} /dev/kvm && exec libvirtd -d"
            reaper = _start_reaped(["unshare", "-m", "--propagation", "private", "sh", "-c",
                                    hide_kvm])  # fmt: skip
            state = "started (with /dev/kvm hidden: no hardware virtualization, guests use TCG)"
    deadline = time.monotonic() + timeout_s
    while not libvirt_answers():
        if reaper is not None and reaper.poll() is not None:
            raise RuntimeError(
                "libvirtd exited as it started: run `libvirtd` in a terminal to see why"
            )
        if time.monotonic() > deadline:
            raise RuntimeError(f"libvirtd did not answer on {LIBVIRT_URI} within {timeout_s} s")
        time.sleep(0.3)
    return state


def _pids(name: str) -> list[int]:
    found = subprocess.run(["pgrep", "-x", name], capture_output=True, text=True).stdout
    return [int(pid) for pid in found.split()]


def restart_libvirtd(timeout_s: float = 30.0) -> str:
    """Stop libvirtd (SIGTERM; SIGKILL after `timeout_s`) and start it again as
    ensure_libvirtd does, /dev/kvm hidden where there is no hardware virtualization.
    Running domains survive it: the new libvirtd reattaches to their QEMU processes."""
    pids = _pids("libvirtd")
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while _pids("libvirtd"):
        if time.monotonic() > deadline:
            for pid in _pids("libvirtd"):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    state = ensure_libvirtd(timeout_s)
    return f"restarted (was pid {', '.join(map(str, pids)) or 'none'}); {state}"


def missing_tools() -> list[str]:
    tools = ["virsh", "libvirtd", "virtlogd", "qemu-img", "redis-server"]
    return [t for t in tools if shutil.which(t) is None]
