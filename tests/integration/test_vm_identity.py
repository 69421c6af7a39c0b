"""Per-VM identities and limits on the host, seen from an escaped QEMU's side (real VMs).

Two live sessions of the shared stack: their QEMU processes run as two different uids of the
per-VM range, and a process running as the first VM's uid (what a QEMU escape gets) can open
none of the second VM's files, no template or image file for writing, and everything QEMU
itself needs for reading. Each VM's limits are in place: memory and pids in its cgroups, a CPU
quota, and a throttle on its data disk. The worker's status says which controllers it found.
"""

from __future__ import annotations

import json
import subprocess
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from shoal import data_disk, images, keys, redis_conn
from shoal.hosts import heartbeats
from shoal.settings import Settings, load
from tests.integration.conftest import Stack
from workers import domain as dom
from workers import shared_memory, templates
from workers.cgroups import probe_controller

pytestmark = pytest.mark.guest

# The probe runs as a VM's uid, which cannot reach an interpreter under /root (0700).
SYSTEM_PYTHON = "/usr/bin/python3"
# Runs as a VM's uid: tries each (path, how) and says what happened.
PROBE = r"""
import errno, json, os, socket, sys
results = {}
for path, how in json.loads(sys.argv[1]):
    try:
        if how == "connect":
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            s.close()
        elif how == "list":
            os.listdir(path)
        else:
            flags = {"read": os.O_RDONLY, "write": os.O_WRONLY, "readwrite": os.O_RDWR}[how]
            os.close(os.open(path, flags))
        results[f"{how} {path}"] = "ok"
    except OSError as exc:
        results[f"{how} {path}"] = errno.errorcode.get(exc.errno, str(exc.errno))
print(json.dumps(results))
"""


@dataclass
class LiveVM:
    session_id: str
    name: str
    pid: int
    uid: int
    gid: int
    paths: dom.VMPaths
    xml: str


def _ids(pid: int, field: str) -> list[int]:
    status = Path(f"/proc/{pid}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith(field + ":"))
    return [int(x) for x in line.split()[1:]]


def _live_vm(stack: Stack, settings: Settings, session_id: str) -> LiveVM:
    vm_id = redis_conn.client(settings).hget(keys.session(session_id), "vm")
    assert vm_id, f"session {session_id} has no VM"
    key = dom.vm_key(vm_id)
    name = dom.domain_name(settings, key)
    pid = int(Path(f"/run/libvirt/qemu/{name}.pid").read_text())
    xml = subprocess.run(
        ["virsh", "-c", "qemu:///system", "dumpxml", name],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    uids, gids = _ids(pid, "Uid"), _ids(pid, "Gid")
    assert len(set(uids)) == 1 and len(set(gids)) == 1, (uids, gids)  # real = effective = saved
    return LiveVM(session_id, name, pid, uids[0], gids[0], dom.vm_paths(settings, key), xml)


def run_as(uid: int, gid: int, source: str, *args: str) -> str:
    """Run Python `source` as uid:gid (no other group) with the system interpreter; its stdout."""
    result = subprocess.run(
        [SYSTEM_PYTHON, "-c", source, *args],
        user=uid,
        group=gid,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _as_uid(uid: int, gid: int, checks: list[tuple[Path, str]]) -> dict[str, str]:
    return json.loads(run_as(uid, gid, PROBE, json.dumps([(str(p), how) for p, how in checks])))


@pytest.fixture(scope="module")
def two_vms(stack: Stack):
    settings = load(stack.env)
    first, second = stack.new_session(), stack.new_session()
    for session_id in (first, second):
        assert stack.execute(session_id, "print('up')")["stdout"] == "up\n"
    yield settings, _live_vm(stack, settings, first), _live_vm(stack, settings, second)
    for session_id in (first, second):
        requests.delete(
            f"{stack.url}/v1/sessions/{session_id}", headers=stack.headers(), timeout=60
        )


def _template_files(settings: Settings, vm: LiveVM) -> list[Path]:
    meta = dom.read_metadata(vm.xml)
    found = list((settings.instance_vm_dir / "templates").glob(f"*-{meta['template']}"))
    assert len(found) == 1, found
    shared = [found[0] / shared_memory.MEMORY_FILE, found[0] / shared_memory.DEVICE_STATE_FILE]
    return [found[0] / templates.STATE_FILE, found[0] / templates.DISK_FILE, *shared]


def _image_files(settings: Settings) -> list[Path]:
    """The guest image, and the empty data disk at the bottom of every VM's disk chain."""
    artifacts = images.locate(settings, settings.default_image)
    assert artifacts is not None
    base = data_disk.data_disk_base(settings, settings.data_disk_mib)
    return [artifacts.kernel, artifacts.initrd, artifacts.rootfs, base]


def test_each_vm_runs_under_its_own_uid(two_vms) -> None:
    settings, one, two = two_vms
    uid_range = range(settings.vm_uid_base, settings.vm_uid_base + settings.vm_uid_count)
    assert one.uid in uid_range and two.uid in uid_range
    assert one.uid != two.uid and one.gid != two.gid
    for vm in (one, two):
        assert set(_ids(vm.pid, "Groups")) <= {vm.gid}  # no group shared with anyone
    for vm in (one, two):
        seclabel = ET.fromstring(vm.xml).find("seclabel[@model='dac']")
        assert seclabel.get("relabel") == "no"
        assert seclabel.findtext("label") == f"+{vm.uid}:+{vm.gid}"
        # Its directory: root's, entered by its gid alone; its files: its own, nobody else's.
        st = vm.paths.dir.stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, vm.gid, 0o710)
        for path in (vm.paths.data_disk, vm.paths.socket, vm.paths.console_log):
            st = path.stat()
            assert (st.st_uid, st.st_mode & 0o777) == (vm.uid, 0o600), path
        # The transfer disk: root's, its group may read it (QEMU opens it read-only).
        st = vm.paths.transfer_disk.stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, vm.gid, 0o640)


def test_a_vm_uid_opens_nothing_of_another_vm_and_no_shared_file_for_writing(two_vms) -> None:
    settings, one, two = two_vms
    theirs = [
        (two.paths.dir, "list"),
        (two.paths.data_disk, "read"),
        (two.paths.data_disk, "readwrite"),
        (two.paths.console_log, "read"),
        (two.paths.console_log, "write"),
        (two.paths.socket, "connect"),
        (two.paths.transfer_disk, "read"),
    ]
    template_state, template_disk, *template_memory = _template_files(settings, one)
    shared = [*_image_files(settings), template_disk, template_state, *template_memory]
    writes = [(path, how) for path in shared for how in ("write", "readwrite")]
    needed = [(path, "read") for path in [*_image_files(settings), template_disk]]
    own = [
        (one.paths.data_disk, "readwrite"),
        (one.paths.console_log, "read"),
        (one.paths.transfer_disk, "read"),
    ]
    refused = [*theirs, *writes, (one.paths.transfer_disk, "write")]
    results = _as_uid(one.uid, one.gid, [*refused, *needed, *own])
    print(json.dumps(results, indent=1))
    for path, how in refused:
        assert results[f"{how} {path}"] == "EACCES", (path, how)
    for path, how in [*needed, *own]:
        assert results[f"{how} {path}"] == "ok", (path, how)
    # The template's save image and memory are root's alone: no VM reads them either.
    private = [(path, "read") for path in (template_state, *template_memory)]
    assert _as_uid(one.uid, one.gid, private) == {f"read {p}": "EACCES" for p, _how in private}


def _cgroup_dir(pid: int, controller: str) -> Path:
    probe = probe_controller(controller)
    assert probe.available, probe.detail
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _h, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return Path(probe.mount) / path.lstrip("/")
    raise AssertionError(f"{pid} is in no {controller} group")


def test_each_vm_has_its_limits(two_vms) -> None:
    settings, one, two = two_vms
    memory_mib = 512  # tests/integration/pools.toml's default pool, as the stack's settings
    tb = settings.tb_cache_mib
    for vm in (one, two):
        memory = _cgroup_dir(vm.pid, "memory")
        limit = int((memory / "memory.limit_in_bytes").read_text())
        assert limit == (memory_mib + tb + settings.vm_memory_overhead_mib) << 20, limit
        usage = int((memory / "memory.max_usage_in_bytes").read_text())
        print(f"{vm.name}: memory peak {usage >> 20} MiB of a {limit >> 20} MiB limit")
        assert usage < limit
        pids = _cgroup_dir(vm.pid, "pids")
        assert pids.name == vm.name  # a group of Shoal's own: libvirt puts QEMU in none
        assert int((pids / "pids.max").read_text()) == settings.vm_pids_max
        assert int((pids / "pids.current").read_text()) >= 2  # QEMU and its vCPU thread
        # CPU: capped at its vCPU count by default.
        root = ET.fromstring(vm.xml)
        assert int(root.findtext("cputune/global_quota")) == 100_000
        cpu = _cgroup_dir(vm.pid, "cpu")
        assert int((cpu.parent / "cpu.cfs_quota_us").read_text()) == 100_000
        # Block I/O: QEMU throttles the writable disk.
        (data,) = [d for d in root.findall("devices/disk") if d.find("target").get("dev") == "vdb"]
        assert int(data.findtext("iotune/total_bytes_sec")) == settings.vm_disk_bytes_per_s
        assert int(data.findtext("iotune/total_iops_sec")) == settings.vm_disk_iops


def test_the_worker_reports_the_limit_controllers(two_vms) -> None:
    settings, _one, _two = two_vms
    deadline = time.monotonic() + 10
    while True:
        beat = heartbeats(redis_conn.client(settings)).get(settings.host_name)
        limits = (beat or {}).get("driver", {}).get("vm_limits", {})
        if limits.get("last_vm") or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert limits["controllers"]["memory"]["available"] is True
    assert limits["controllers"]["pids"]["available"] is True
    assert limits["last_vm"]["memory"].endswith("memory.limit_in_bytes")
    assert limits["last_vm"]["pids"].endswith("pids.max")


# Reads the root file system through the guest's page cache until the guest has used all of
# its memory: QEMU's resident memory then approaches guest memory + its own, the most a guest
# can make it hold without breaking out.
FILL_GUEST_MEMORY = """
import os
n = 0
for root, _dirs, files in os.walk('/usr'):
    for name in files:
        path = os.path.join(root, name)
        if os.path.islink(path):
            continue
        try:
            with open(path, 'rb') as f:
                while chunk := f.read(1 << 20):
                    n += len(chunk)
        except OSError:
            pass
        if n > 640 << 20:
            break
    if n > 640 << 20:
        break
print(n >> 20)
"""


def test_a_guest_using_all_its_memory_stays_within_the_limit(stack: Stack, two_vms) -> None:
    settings, one, _two = two_vms
    session_id = one.session_id
    started = time.monotonic()
    answer = stack.execute(session_id, FILL_GUEST_MEMORY, timeout_s=200)
    assert answer["status"] == "succeeded", answer
    memory = _cgroup_dir(one.pid, "memory")
    peak = int((memory / "memory.max_usage_in_bytes").read_text())
    limit = int((memory / "memory.limit_in_bytes").read_text())
    rss_kib = int(
        next(
            x
            for x in Path(f"/proc/{one.pid}/status").read_text().splitlines()
            if x.startswith("VmRSS:")
        ).split()[1]
    )
    print(
        f"read {answer['stdout'].strip()} MiB in the guest in {time.monotonic() - started:.0f} s: "
        f"QEMU RSS {rss_kib >> 10} MiB, cgroup peak {peak >> 20} MiB (page cache included), "
        f"limit {limit >> 20} MiB"
    )
    assert Path(f"/proc/{one.pid}").exists()  # not OOM-killed
    assert stack.execute(session_id, "print('alive')")["stdout"] == "alive\n"
