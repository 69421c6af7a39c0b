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
    (call,) = [c for c in started if c["argv"][0] == "libvirtd"]
    assert call["start_new_session"] is True
    assert not any(name.startswith("SHOAL_") for name in call["env"])
