"""Clones that share their template's memory (workers/shared_memory.py), on the shared stack's
real VMs: both QEMUs map one sealed memfd privately; a process running as a VM's uid (what a
QEMU escape gets) can reopen it but write it in no way, and cannot open the template's memory
file at all; a clone's writes reach neither the other clone nor the template; each clone's
randomness is its own; the worker says which mode is active."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path

import pytest
import requests

from shoal import redis_conn
from shoal.hosts import heartbeats
from shoal.settings import load
from tests.integration.conftest import Stack
from tests.integration.test_vm_identity import LiveVM, _live_vm, run_as
from workers import domain as dom
from workers import shared_memory

pytestmark = pytest.mark.guest

# Runs as a VM's uid against its own QEMU's memory fd: what an escaped QEMU could try.
ESCAPE = r"""
import errno, json, mmap, os, sys
path = sys.argv[1]
tries = {}
fd = os.open(path, os.O_RDWR)
for what, attempt in [
    ("write", lambda: os.pwrite(fd, b"x", 0)),
    ("truncate", lambda: os.ftruncate(fd, 4096)),
    ("shared_map", lambda: mmap.mmap(fd, 4096, mmap.MAP_SHARED)),
    ("open_memory_file", lambda: os.open(sys.argv[2], os.O_RDONLY)),
]:
    try:
        attempt()
        tries[what] = "done"
    except OSError as exc:
        tries[what] = errno.errorcode[exc.errno]
print(json.dumps(tries))
"""
RANDOM = "import os, random; (random.random(), os.urandom(8).hex())"


def _memory_fd(vm: LiveVM) -> Path:
    """The fd QEMU maps the guest RAM from (its argv says /proc/self/fd/N)."""
    argv = Path(f"/proc/{vm.pid}/cmdline").read_bytes().split(b"\0")
    backends = [json.loads(a) for a in argv if a.startswith(b"{") and b'"pc.ram"' in a]
    assert len(backends) == 1, argv
    backend = backends[0]
    assert backend["qom-type"] == "memory-backend-file" and backend["share"] is False, backend
    number = re.fullmatch(r"/proc/self/fd/(\d+)", backend["mem-path"])
    assert number, backend
    return Path(f"/proc/{vm.pid}/fd/{number.group(1)}")


def _template_memory(settings, vm: LiveVM) -> Path:
    meta = dom.read_metadata(vm.xml)
    found = list((settings.instance_vm_dir / "templates").glob(f"*-{meta['template']}"))
    assert len(found) == 1, found
    return found[0] / shared_memory.MEMORY_FILE


def _digest(path: Path, limit: int = 64 << 20) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(limit)).hexdigest()


@pytest.fixture(scope="module")
def clones(stack: Stack):
    settings = load(stack.env)
    sessions = [stack.new_session(), stack.new_session()]
    answers = [stack.execute(session_id, RANDOM) for session_id in sessions]
    yield settings, [_live_vm(stack, settings, s) for s in sessions], answers
    for session_id in sessions:
        requests.delete(
            f"{stack.url}/v1/sessions/{session_id}", headers=stack.headers(), timeout=60
        )


def test_both_clones_map_one_sealed_memfd_privately(clones) -> None:
    _settings, (one, two), _answers = clones
    first, second = _memory_fd(one), _memory_fd(two)
    assert os.readlink(first).startswith("/memfd:shoal-")
    assert os.stat(first).st_ino == os.stat(second).st_ino  # the same memory, shared


def test_a_vm_uid_can_write_the_template_memory_in_no_way(clones) -> None:
    settings, (one, _two), _answers = clones
    memory_file = _template_memory(settings, one)
    assert memory_file.stat().st_mode & 0o777 == 0o600 and memory_file.stat().st_uid == 0
    seen = run_as(one.uid, one.gid, ESCAPE, str(_memory_fd(one)), str(memory_file))
    assert json.loads(seen) == {
        "write": "EPERM",
        "truncate": "EPERM",
        "shared_map": "EPERM",
        "open_memory_file": "EACCES",
    }


def test_a_clones_writes_reach_neither_the_other_clone_nor_the_template(
    stack: Stack, clones
) -> None:
    settings, (one, two), _answers = clones
    memory = _memory_fd(one)
    before = (_digest(memory), _digest(_template_memory(settings, one)))
    # Touch much of the guest's memory in the first clone: page cache, heap, a variable.
    code = "secret = 'only-here'; junk = bytearray(os.urandom(1 << 20)) * 96; len(junk)"
    answer = stack.execute(one.session_id, "import os\n" + code)
    assert answer["status"] == "succeeded", answer
    seen = stack.execute(two.session_id, "'secret' in globals()")
    assert seen["result"]["text/plain"] == "False"
    assert (_digest(memory), _digest(_template_memory(settings, one))) == before


def test_each_clone_has_its_own_randomness(clones) -> None:
    _settings, _vms, answers = clones
    values = [a["result"]["text/plain"] for a in answers]
    assert values[0] != values[1], values


def test_the_worker_reports_template_memory_sharing(clones) -> None:
    settings, _vms, _answers = clones
    deadline = time.monotonic() + 10
    while True:
        beat = heartbeats(redis_conn.client(settings)).get(settings.host_name) or {}
        mode = beat.get("driver", {}).get("memory_sharing", {})
        if mode.get("templates_held") or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert mode["mode"] == "template-memory", mode
    assert mode["templates_held"] >= 1
    assert mode["ksm"].startswith("off") and mode["templates_falling_back"] == []
