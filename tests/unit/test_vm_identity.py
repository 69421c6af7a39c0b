"""Per-VM identities and limits, the parts without libvirt: uid allocation, the domain XML's
seclabel and disk throttle, template sealing, and the cgroup limit writer on a fake hierarchy.
They chown, so they need root, as the worker does."""

from __future__ import annotations

import os
import shutil
import stat
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from shoal.settings import Settings
from workers import cgroups, domain, templates, vm_identity
from workers.vm_identity import VMIdentity


def fake_proc(root: Path, uids: dict[int, int]) -> Path:
    """A /proc with one process per pid, running as the given uid."""
    for pid, uid in uids.items():
        (root / str(pid)).mkdir(parents=True)
        (root / str(pid) / "status").write_text(f"Name:\tq\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n")
    return root


def test_the_lowest_free_uid_of_the_range_is_picked() -> None:
    assert vm_identity.pick_uid(range(900000, 900005), {900000, 900002, 0, 1000}) == 900001
    with pytest.raises(vm_identity.NoFreeUid, match="SHOAL_VM_UID_COUNT"):
        vm_identity.pick_uid(range(900000, 900002), {900000, 900001})


def test_claims_skip_uids_held_by_directories_and_processes(tmp_path: Path) -> None:
    s = Settings(vm_dir=str(tmp_path / "vm"), instance="a", vm_uid_base=900000, vm_uid_count=4)
    proc = fake_proc(tmp_path / "proc", {10: 0, 11: 900001})  # a live QEMU of uid 900001
    registry = tmp_path / "registry"
    first = tmp_path / "vm" / "a" / "vms" / "k1"
    first.parent.mkdir(parents=True)
    assert vm_identity.claim_dir(s, first, proc, registry) == VMIdentity(900000, 900000)
    st = first.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 900000, 0o710)
    # Another instance sharing SHOAL_VM_DIR, and a template build in progress, hold theirs.
    other = tmp_path / "vm" / "b" / "templates" / ".building-t0"
    other.mkdir(parents=True)
    os.chown(other, 0, 900002)
    second = first.parent / "k2"
    assert vm_identity.claim_dir(s, second, proc, registry).uid == 900003
    with pytest.raises(vm_identity.NoFreeUid):
        vm_identity.claim_dir(s, first.parent / "k3", proc, registry)
    # A VM's directory removed (destroyed): its uid is free again.
    first.rmdir()
    assert vm_identity.claim_dir(s, first.parent / "k3", proc, registry).uid == 900000


def test_instances_with_different_vm_dirs_never_share_a_uid(tmp_path: Path) -> None:
    """The lock and the list of VM dirs are host-wide: an instance whose SHOAL_VM_DIR is
    elsewhere (a loop-mounted one, a second deployment) still skips the uids held here."""
    proc = fake_proc(tmp_path / "proc", {10: 0})
    registry = tmp_path / "registry"
    here = Settings(vm_dir=str(tmp_path / "vm1"), instance="a", vm_uid_base=900000)
    there = Settings(vm_dir=str(tmp_path / "vm2"), instance="b", vm_uid_base=900000)
    mine = tmp_path / "vm1" / "a" / "vms" / "k1"
    theirs = tmp_path / "vm2" / "b" / "vms" / "k1"
    mine.parent.mkdir(parents=True)
    theirs.parent.mkdir(parents=True)
    assert vm_identity.claim_dir(here, mine, proc, registry).uid == 900000
    assert vm_identity.claim_dir(there, theirs, proc, registry).uid == 900001
    assert stat.S_IMODE((registry / vm_identity.LOCK_NAME).stat().st_mode) == 0o600
    # A VM dir that is gone holds nothing and leaves the list.
    shutil.rmtree(tmp_path / "vm1")
    assert vm_identity.claim_dir(there, theirs.parent / "k2", proc, registry).uid == 900000
    listed = (registry / vm_identity.VM_DIRS_NAME).read_text().split()
    assert listed == [str(tmp_path / "vm2")]


def test_settings_refuse_a_range_among_ordinary_users() -> None:
    with pytest.raises(SystemExit, match="SHOAL_VM_UID_BASE"):
        Settings(vm_uid_base=100)
    with pytest.raises(SystemExit, match="SHOAL_VM_UID_COUNT"):
        Settings(vm_uid_count=0)


def test_files_are_given_to_the_vm_and_shared_ones_made_read_only(tmp_path: Path) -> None:
    own = tmp_path / "data.qcow2"
    own.write_bytes(b"x")
    vm_identity.give(own, VMIdentity(900010, 900010))
    st = own.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (900010, 900010, 0o600)
    shared = tmp_path / "rootfs.ext4"
    shared.write_bytes(b"x")
    os.chown(shared, 64055, 64055)
    os.chmod(shared, 0o664)
    vm_identity.make_shared_read_only(shared)
    st = shared.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o644)


def test_a_template_is_sealed_root_owned(tmp_path: Path) -> None:
    directory = tmp_path / ".building-t1"
    directory.mkdir(mode=0o700)
    for name in (templates.DISK_FILE, templates.STATE_FILE, "console.log"):
        (directory / name).write_bytes(b"x")
        os.chown(directory / name, 900011, 900011)
    os.chown(directory, 900011, 900011)
    templates.seal(directory)
    modes = {p.name: (p.stat().st_uid, stat.S_IMODE(p.stat().st_mode)) for p in directory.iterdir()}
    assert modes == {
        templates.DISK_FILE: (0, 0o644),
        templates.STATE_FILE: (0, 0o600),
        "console.log": (0, 0o600),
    }
    assert (directory.stat().st_uid, stat.S_IMODE(directory.stat().st_mode)) == (0, 0o711)


def test_libvirts_directory_becomes_traversable_not_listable(tmp_path: Path) -> None:
    lib = tmp_path / "qemu"
    lib.mkdir(mode=0o750)
    os.chmod(lib, 0o750)
    vm_identity.ensure_libvirt_dirs(lib)
    assert stat.S_IMODE(lib.stat().st_mode) == 0o751
    vm_identity.ensure_libvirt_dirs(tmp_path / "missing")  # nothing to do, no error


# --- domain XML ------------------------------------------------------------------------------


def spec(**overrides) -> domain.DomainSpec:
    base = Path("/v/i/vms/0123456789ab")
    values = dict(
        name="shoal-i-h-0123456789ab",
        uuid="0b5c1d9e-3f59-4d9e-9a43-2b7e0f6c1a11",
        accel="tcg",
        vcpus=1,
        memory_mib=512,
        kernel=Path("/img/vmlinuz"),
        initrd=Path("/img/initrd.img"),
        cmdline="console=ttyS0",
        rootfs=Path("/img/rootfs.ext4"),
        data_disk=base / "data.qcow2",
        transfer_disk=base / "transfer.img",
        agent_socket=base / "agent.sock",
        console_log=base / "console.log",
    )
    values.update(overrides)
    return domain.DomainSpec(**values)


def test_the_domain_runs_as_its_own_uid_with_relabel_off() -> None:
    root = ET.fromstring(domain.domain_xml(spec(identity=VMIdentity(900042, 900042))))
    (seclabel,) = root.findall("seclabel")
    assert seclabel.attrib == {"type": "static", "model": "dac", "relabel": "no"}
    assert seclabel.findtext("label") == "+900042:+900042"
    assert vm_identity.identity_of(ET.tostring(root, encoding="unicode")) == VMIdentity(
        900042, 900042
    )
    assert ET.fromstring(domain.domain_xml(spec())).find("seclabel") is None


def test_the_data_disk_is_throttled_and_the_root_disk_is_not() -> None:
    root = ET.fromstring(domain.domain_xml(spec(disk_bytes_per_s=100 << 20, disk_iops=2000)))
    disks = {d.find("target").get("dev"): d for d in root.findall("devices/disk")}
    iotune = disks["vdb"].find("iotune")
    assert iotune.findtext("total_bytes_sec") == str(100 << 20)
    assert iotune.findtext("total_iops_sec") == "2000"
    assert disks["vda"].find("iotune") is None
    unthrottled = ET.fromstring(domain.domain_xml(spec()))
    assert all(d.find("iotune") is None for d in unthrottled.findall("devices/disk"))


# --- cgroup limits ---------------------------------------------------------------------------


def hierarchy(tmp_path: Path, v1: bool = True) -> tuple[Path, Path]:
    """A fake mount table and cgroup tree: memory (libvirt placed QEMU in a group) and pids
    (QEMU left in the root group), as libvirt does here without systemd."""
    mounts = tmp_path / "mounts"
    mem, pids = tmp_path / "cg" / "memory", tmp_path / "cg" / "pids"
    group = mem / "machine" / "qemu-1-vm.libvirt-qemu"
    group.mkdir(parents=True)
    pids.mkdir(parents=True)
    mounts.write_text(
        f"cgroup {mem} cgroup rw,relatime,memory 0 0\ncgroup {pids} cgroup rw,relatime,pids 0 0\n"
    )
    proc = tmp_path / "proc"
    (proc / "77").mkdir(parents=True)
    (proc / "77" / "cgroup").write_text(
        "8:pids:/\n4:memory:/machine/qemu-1-vm.libvirt-qemu\n1:cpu:/machine/x/emulator\n0::/\n"
    )
    return mounts, proc


def test_limits_go_into_libvirts_group_or_a_group_of_ours(tmp_path: Path) -> None:
    mounts, proc = hierarchy(tmp_path)
    memory = cgroups.probe_controller("memory", str(mounts))
    pids = cgroups.probe_controller("pids", str(mounts))
    assert memory.available and memory.version == "v1"
    written = cgroups.apply_vm_limit(77, "shoal-i-h-k", memory, 900 << 20, str(proc))
    assert written.endswith("machine/qemu-1-vm.libvirt-qemu/memory.limit_in_bytes")
    assert Path(written).read_text() == str(900 << 20)
    written = cgroups.apply_vm_limit(77, "shoal-i-h-k", pids, 256, str(proc))
    group = tmp_path / "cg" / "pids" / "shoal" / "shoal-i-h-k"
    assert Path(written) == group / "pids.max"
    assert (group / "pids.max").read_text() == "256"
    assert (group / "cgroup.procs").read_text() == "77"  # QEMU moved in, with its threads
    for name in ("pids.max", "cgroup.procs"):  # a real cgroup empties itself
        (group / name).unlink()
    cgroups.remove_vm_groups("shoal-i-h-k", [memory, pids])
    assert not group.exists()


def test_a_missing_controller_is_named_not_fatal(tmp_path: Path) -> None:
    mounts, proc = hierarchy(tmp_path)
    blkio = cgroups.probe_controller("blkio", str(mounts))
    assert not blkio.available
    assert "no cgroup blkio controller" in blkio.detail
    with pytest.raises(ValueError, match="no cgroup blkio controller"):
        cgroups.apply_vm_limit(77, "vm", blkio, 1, str(proc))
    cgroups.remove_vm_groups("vm", [blkio])


def test_cgroup_v2_limits_the_domain_group_above_emulator(tmp_path: Path) -> None:
    root = tmp_path / "unified"
    domain_group = root / "machine" / "qemu-2-vm.libvirt-qemu"
    (domain_group / "emulator").mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpu memory pids\n")
    mounts = tmp_path / "mounts"
    mounts.write_text(f"cgroup2 {root} cgroup2 rw 0 0\n")
    proc = tmp_path / "proc"
    (proc / "5").mkdir(parents=True)
    (proc / "5" / "cgroup").write_text("0::/machine/qemu-2-vm.libvirt-qemu/emulator\n")
    pids = cgroups.probe_controller("pids", str(mounts))
    assert pids.version == "v2"
    assert cgroups.apply_vm_limit(5, "vm", pids, 128, str(proc)) == str(domain_group / "pids.max")
    assert (domain_group / "pids.max").read_text() == "128"


def test_a_kvm_device_closed_to_other_users_is_named(tmp_path: Path) -> None:
    device = tmp_path / "kvm"
    device.write_bytes(b"")
    os.chmod(device, 0o660)
    assert "make it 0666" in vm_identity.kvm_device_problem(device)
    os.chmod(device, 0o666)
    assert vm_identity.kvm_device_problem(device) is None
    assert "No such file" in vm_identity.kvm_device_problem(tmp_path / "none")


def test_a_group_still_held_by_an_exiting_qemu_is_removed_once_it_leaves(monkeypatch):
    """rmdir of a v1 group answers EBUSY while QEMU is still in it (a save or destroy that
    has just returned): removal waits for it instead of leaking the group."""
    import errno

    calls = []

    def rmdir(path):
        calls.append(path)
        if len(calls) < 3:
            raise OSError(errno.EBUSY, "busy")

    monkeypatch.setattr(cgroups.os, "rmdir", rmdir)
    monkeypatch.setattr(cgroups.time, "sleep", lambda s: None)
    pids = cgroups.ControllerProbe("pids", True, "v1", "/sys/fs/cgroup/pids", "")
    cgroups.remove_vm_groups("shoal-i-h-k", [pids])
    assert calls == ["/sys/fs/cgroup/pids/shoal/shoal-i-h-k"] * 3


def test_the_sweep_removes_empty_groups_of_vms_gone(tmp_path: Path) -> None:
    """A group whose QEMU left it too late for the teardown's wait is removed by a later sweep;
    live VMs' groups and other instances' stay."""
    top = tmp_path / cgroups.OWN_GROUP
    for name in ("shoal-i-h-aaa", "shoal-i-h-bbb", "shoal-other-h-ccc"):
        (top / name).mkdir(parents=True)
    probe = cgroups.ControllerProbe("pids", True, "v1", str(tmp_path), "")
    cgroups.remove_stale_groups("shoal-i-h-", lambda: {"shoal-i-h-aaa"}, [probe])
    assert sorted(p.name for p in top.iterdir()) == ["shoal-i-h-aaa", "shoal-other-h-ccc"]
