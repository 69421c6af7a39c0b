"""The hardened guest's pieces that run without a VM: the setuid strip of the image builder and
the sizing of the session's cgroup (vm-images/agent/confine.py). The guest itself is checked
from user code in tests/integration/test_guest_hardening.py."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from shoal.ops.image_harden import strip_privileges

AGENT_DIR = Path(__file__).resolve().parents[2] / "vm-images" / "agent"
MIB = 1 << 20


@pytest.fixture(scope="module")
def confine():
    sys.path.insert(0, str(AGENT_DIR))
    try:
        import confine
    finally:
        sys.path.remove(str(AGENT_DIR))
    return confine


def test_setid_bits_are_stripped_without_touching_the_base_layer(tmp_path):
    base, staged = tmp_path / "base", tmp_path / "staged"
    (base / "usr/bin").mkdir(parents=True)
    (base / "var/mail").mkdir(parents=True)
    (base / "usr/bin/su").write_bytes(b"su binary")
    (base / "usr/bin/su").chmod(0o4755)
    (base / "usr/bin/expiry").write_bytes(b"setgid")
    (base / "usr/bin/expiry").chmod(0o2755)
    (base / "usr/bin/ls").write_bytes(b"plain")
    (base / "usr/bin/ls").chmod(0o755)
    (base / "var/mail").chmod(0o2775)
    (base / "usr/bin/link").symlink_to("su")
    # The final layer stages a hard-linked copy of the base root (cp -al).
    subprocess.run(["cp", "-al", str(base), str(staged)], check=True)

    stripped = strip_privileges(staged)

    assert stripped == ["/usr/bin/expiry", "/usr/bin/su", "/var/mail"]
    assert stat.S_IMODE((staged / "usr/bin/su").stat().st_mode) == 0o755
    assert stat.S_IMODE((staged / "usr/bin/expiry").stat().st_mode) == 0o755
    assert stat.S_IMODE((staged / "var/mail").stat().st_mode) == 0o775
    assert (staged / "usr/bin/su").read_bytes() == b"su binary"
    # The base layer keeps its files as they were: the staged ones were rewritten, not chmod-ed.
    assert stat.S_IMODE((base / "usr/bin/su").stat().st_mode) == 0o4755
    assert stat.S_IMODE((base / "usr/bin/expiry").stat().st_mode) == 0o2755
    assert (staged / "usr/bin/ls").stat().st_ino == (base / "usr/bin/ls").stat().st_ino
    assert strip_privileges(staged) == []


def test_limits_leave_the_agent_headroom(confine):
    small = confine.default_limits(480 * MIB)
    assert small.memory_bytes == 480 * MIB - 128 * MIB and small.pids == 256
    large = confine.default_limits(4096 * MIB)
    assert large.memory_bytes == 3072 * MIB  # a quarter kept back
    assert confine.default_limits(100 * MIB).memory_bytes == 32 * MIB  # never below 32 MiB


def test_limits_follow_the_kernel_command_line(confine):
    cmdline = "console=ttyS0 shoal.user_memory_mib=200 shoal.user_pids=64 shoal.tmp_mib=256"
    assert confine.default_limits(480 * MIB, cmdline) == confine.Limits(200 * MIB, 64)
    # Nonsense is ignored; more than the guest has is capped at what it has.
    odd = "shoal.user_memory_mib=-1 shoal.user_pids=abc shoal.user_pids=0"
    assert confine.default_limits(480 * MIB, odd) == confine.default_limits(480 * MIB)
    assert confine.default_limits(480 * MIB, "shoal.user_memory_mib=9999").memory_bytes == (
        480 * MIB
    )


def test_oom_kills_are_read_from_memory_events(confine, tmp_path):
    cgroup = confine.UserCgroup(str(tmp_path), confine.Limits(256 * MIB, 256))
    leaf = Path(cgroup.leaf(confine.KERNEL_LEAF))
    assert cgroup.oom_kills(confine.KERNEL_LEAF) == 0  # no file: none
    leaf.mkdir(parents=True)
    (leaf / "memory.events").write_text("low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\n")
    assert cgroup.oom_kills(confine.KERNEL_LEAF) == 1
    (leaf / "memory.events").write_text("oom 1\noom_kill 2\noom_group_kill 1\n")
    assert cgroup.oom_kills(confine.KERNEL_LEAF) == 3


def test_outside_the_guest_nothing_is_set_up(confine):
    assert os.getpid() != 1
    assert confine.setup() is None  # the host's cgroups are never touched


def test_the_host_refuses_a_guest_that_does_not_report_every_measure_in_force():
    from workers.vm_domains import CONFINEMENT, unconfined_measures

    every = dict.fromkeys(CONFINEMENT, True)
    assert unconfined_measures({"confinement": every}) == []
    assert unconfined_measures({"confinement": {**every, "proc_hidden": False}}) == ["proc_hidden"]
    assert unconfined_measures({"confinement": {**every, "user_cgroup": "yes"}}) == ["user_cgroup"]
    assert unconfined_measures({}) == list(CONFINEMENT)
    assert unconfined_measures({"confinement": []}) == list(CONFINEMENT)


def test_the_agent_reports_what_is_in_force_from_the_live_system(confine):
    """On this host (the agent's unit tests run here, not in a guest) there is no user cgroup;
    the report reads the rest from /proc, whatever it holds, and never raises."""
    report = confine.report(None)
    assert set(report) == {"user_cgroup", "no_user_namespaces", "ptrace_restricted", "proc_hidden"}
    assert report["user_cgroup"] is False
    assert all(isinstance(v, bool) for v in report.values())
