"""Accelerator honesty: SHOAL_REQUIRE_KVM=1 refuses to start where KVM is not usable (the
refusal logic, the worker's exit, `shoal up`'s pre-check), and what `shoal up` says about TCG.
No libvirt, no QEMU: /proc/cpuinfo and /dev/kvm are files the tests make."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shoal.hosts import TCG_WARNING
from shoal.ops import stack
from shoal.settings import REPO_ROOT
from tests.unit.fakes import unit_settings
from workers import accel

WITH_VMX = "processor : 0\nflags : fpu vme de pse tsc msr vmx sse\n"
WITHOUT = "processor : 0\nflags : fpu vme de pse tsc msr sse\n"


def cpuinfo(tmp_path: Path, text: str) -> str:
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    return str(path)


def test_no_hardware_flags_is_refused_with_the_reason(tmp_path) -> None:
    why = accel.kvm_refusal("auto", None, cpuinfo(tmp_path, WITHOUT), str(tmp_path / "kvm"))
    assert why is not None
    assert "SHOAL_REQUIRE_KVM=1" in why and "no vmx/svm flag" in why
    assert "not a hardware isolation boundary" in why and "refusing to start" in why


def test_a_device_that_cannot_be_opened_is_refused(tmp_path) -> None:
    why = accel.kvm_refusal("auto", None, cpuinfo(tmp_path, WITH_VMX), str(tmp_path / "kvm"))
    assert why is not None and "cannot be opened" in why


def test_libvirt_without_the_kvm_domain_type_is_refused(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(accel, "kvm_device_usable", lambda path="": (True, ""))
    why = accel.kvm_refusal("auto", False, cpuinfo(tmp_path, WITH_VMX), "/dev/kvm")
    assert why is not None and "libvirtd does not offer the kvm domain type" in why


def test_usable_kvm_is_accepted(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(accel, "kvm_device_usable", lambda path="": (True, ""))
    assert accel.kvm_refusal("auto", True, cpuinfo(tmp_path, WITH_VMX), "/dev/kvm") is None
    assert accel.kvm_refusal("auto", None, cpuinfo(tmp_path, WITH_VMX), "/dev/kvm") is None


def test_forced_kvm_is_verified_and_forced_tcg_contradicts(tmp_path) -> None:
    """SHOAL_ACCEL=kvm is taken on trust by detect(); a requirement is checked all the same."""
    assert accel.detect("kvm").kind == accel.KVM
    why = accel.kvm_refusal("kvm", None, cpuinfo(tmp_path, WITHOUT), str(tmp_path / "kvm"))
    assert why is not None and "no vmx/svm flag" in why
    why = accel.kvm_refusal("tcg", True, cpuinfo(tmp_path, WITH_VMX), "/dev/kvm")
    assert why is not None and "contradict" in why


def test_not_required_is_never_refused() -> None:
    assert accel.required_kvm_refusal(unit_settings(require_kvm=0, accel="tcg")) is None


def test_the_worker_exits_non_zero_before_taking_a_task() -> None:
    """The real `celery worker` command, as `shoal up` starts it: it stops in worker_init, before
    it connects to the broker (none answers at this URL) or starts a VM."""
    env = {
        **os.environ,
        "SHOAL_REQUIRE_KVM": "1",
        "SHOAL_ACCEL": "tcg",
        "SHOAL_REDIS_URL": "redis://127.0.0.1:1/0",
        "SHOAL_HOME": "/tmp/shoal-unit-require-kvm",
        "PYTHONPATH": str(REPO_ROOT),
    }
    argv = [sys.executable, "-m", "celery", "-A", "workers.worker_app", "worker", "-P", "threads"]
    argv += ["-c", "1", "-n", "require-kvm@unit", "--without-gossip", "--without-mingle"]
    done = subprocess.run(argv, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 78, done.stdout + done.stderr
    assert "shoal worker: SHOAL_REQUIRE_KVM=1" in done.stderr
    assert "not a hardware isolation boundary" in done.stderr


def test_up_refuses_before_starting_the_services(monkeypatch, tmp_path, capsys) -> None:
    """`shoal up` checks as the worker does, after Redis and the daemons, before the image and
    the services; it fails with the message and stops what it started."""
    settings = unit_settings(home=str(tmp_path), require_kvm=1, accel="tcg")
    started, stopped = [], []
    monkeypatch.setattr(stack.daemons, "missing_tools", lambda: [])
    monkeypatch.setattr(stack, "start_redis", lambda s: started.append("redis"))
    monkeypatch.setattr(stack, "admin_key", lambda s: "shoal_admin_x")
    monkeypatch.setattr(stack.daemons, "ensure_virtlogd", lambda: "already running")
    monkeypatch.setattr(stack.daemons, "ensure_libvirtd", lambda: "already running")
    monkeypatch.setattr(stack, "ensure_image", lambda s: started.append("image"))
    monkeypatch.setattr(stack, "start_services", lambda s: started.append("services"))
    monkeypatch.setattr(stack, "stop_components", lambda s: stopped.append(True) or [])
    assert stack.up(settings, detach=True) == 1
    assert started == ["redis"] and stopped == [True]
    err = capsys.readouterr().err
    assert "failed to start worker: SHOAL_REQUIRE_KVM=1" in err and "contradict" in err


def test_up_says_plainly_when_guests_run_under_tcg() -> None:
    report = {
        "workers": {
            "h1": {"accelerator": {"kind": "tcg", "reason": "no vmx/svm", "warning": TCG_WARNING}},
            "h2": {"accelerator": {"kind": "kvm", "reason": "vmx/svm and /dev/kvm"}},
        }
    }
    lines = stack.accelerator_lines(report)
    assert lines[0].startswith("guests on h1 run under TCG (no vmx/svm)")
    assert f"WARNING: {TCG_WARNING}" in lines[0]
    assert lines[1] == "guests on h2 run under KVM (vmx/svm and /dev/kvm)"


@pytest.fixture()
def fake_redis(monkeypatch):
    import fakeredis

    from shoal import redis_conn

    r = fakeredis.FakeRedis(decode_responses=True)
    monkeypatch.setattr(redis_conn, "client", lambda settings: r)
    return r


def test_up_keeps_the_admin_key_0600_and_reuses_it_while_valid(tmp_path, fake_redis) -> None:
    from shoal import admin_keys, tenants

    settings = unit_settings(home=str(tmp_path))
    key = stack.admin_key(settings)
    path = tmp_path / stack.ADMIN_KEY_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    assert admin_keys.is_admin(fake_redis, key) and stack.read_admin_key(settings) == key
    assert stack.admin_key(settings) == key  # still valid: the same one
    key_id = fake_redis.hget(f"shoal:apikey:{tenants.hash_key(key)}", "key_id")
    tenants.revoke(fake_redis, key_id)
    fresh = stack.admin_key(settings)
    assert fresh != key and admin_keys.is_admin(fake_redis, fresh)
    assert path.read_text().strip() == fresh and path.stat().st_mode & 0o777 == 0o600
