"""Host daemons belong to the host, not to the instance whose `shoal up` happened to start them."""

from __future__ import annotations

import subprocess

import pytest

from shoal.ops import daemons


@pytest.fixture()
def started(monkeypatch) -> list[dict]:
    calls: list[dict] = []

    def fake_run(argv, **kwargs):
        calls.append({"argv": argv, **kwargs})
        return subprocess.CompletedProcess(argv, 0)

    monkeypatch.setattr(daemons.subprocess, "run", fake_run)
    monkeypatch.setattr(daemons.subprocess, "Popen", fake_run)
    monkeypatch.setattr(daemons, "_running", lambda name: False)
    monkeypatch.setenv("SHOAL_HOME", "/tmp/some-instance")
    monkeypatch.setenv("SHOAL_REDIS_URL", "redis://127.0.0.1:1/0")
    return calls


def test_virtlogd_starts_clean_and_on_its_own(started) -> None:
    assert daemons.ensure_virtlogd() == "started"
    (call,) = started
    assert call["argv"] == ["virtlogd", "-d"]
    assert call["start_new_session"] is True
    assert not any(name.startswith("SHOAL_") for name in call["env"])
    assert call["env"]["PATH"]


def test_libvirtd_starts_clean_and_on_its_own(started, monkeypatch) -> None:
    monkeypatch.setattr(daemons, "hardware_virtualization", lambda: True)
    monkeypatch.setattr(daemons, "libvirt_answers", lambda: True)
    daemons.ensure_libvirtd()
    (call,) = [c for c in started if "libvirtd" in c["argv"]]
    # Below a reaper of its own (shoal/ops/reaper.py), which reaps the QEMUs it daemonizes.
    assert call["argv"][1:] == ["-m", "shoal.ops.reaper", "libvirtd", "-d"]
    assert call["start_new_session"] is True
    assert not any(name.startswith("SHOAL_") for name in call["env"])


def test_restarting_libvirtd_stops_it_then_starts_it_as_up_does(monkeypatch) -> None:
    """`shoal daemons --restart-libvirtd`: SIGTERM, wait until it is gone, then the same start
    as `shoal up` (the real restart, with guests running, is in tests/integration/
    test_faults.py)."""
    alive = {4242}
    signals: list[tuple[int, int]] = []

    def kill(pid: int, sig: int) -> None:
        signals.append((pid, sig))
        alive.discard(pid)

    monkeypatch.setattr(daemons, "_pids", lambda name: sorted(alive))
    monkeypatch.setattr(daemons.os, "kill", kill)
    monkeypatch.setattr(daemons, "ensure_libvirtd", lambda timeout_s: "started")
    assert daemons.restart_libvirtd() == "restarted (was pid 4242); started"
    assert signals == [(4242, daemons.signal.SIGTERM)]


def test_a_dead_private_redis_comes_back_on_its_port(tmp_path) -> None:
    from shoal import redis_conn
    from shoal.ops import private_redis
    from shoal.ops.stack import free_port
    from shoal.secret_files import write_secret
    from shoal.settings import Settings

    settings = Settings(home=str(tmp_path))
    assert private_redis.previous_port(settings, wait_s=0) is None
    port = free_port()
    write_secret(redis_conn.private_url_file(settings), f"redis://:pw@127.0.0.1:{port}/0\n")
    assert private_redis.previous_port(settings, wait_s=0) == port


def test_a_libvirtd_that_exits_as_it_starts_is_reported_at_once(monkeypatch) -> None:
    class Exited:
        def poll(self) -> int:
            return 1

    monkeypatch.setattr(daemons, "_running", lambda name: False)
    monkeypatch.setattr(daemons, "hardware_virtualization", lambda: True)
    monkeypatch.setattr(daemons, "libvirt_answers", lambda: False)
    monkeypatch.setattr(daemons.subprocess, "Popen", lambda argv, **kw: Exited())
    with pytest.raises(RuntimeError, match="libvirtd exited as it started"):
        daemons.ensure_libvirtd(timeout_s=30)
