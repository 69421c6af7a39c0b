"""Per-VM identities on the host: each VM's QEMU runs under a uid/gid of its own.

Why. Every QEMU used to run as `libvirt-qemu`, which could open every VM's overlay and data
disk: one QEMU escape reached every tenant. Now each live VM gets a uid (its gid is the same
number) from SHOAL_VM_UID_BASE .. SHOAL_VM_UID_BASE + SHOAL_VM_UID_COUNT - 1, far above
ordinary users and with no passwd entry (so no supplementary groups), and its domain carries
`<seclabel type='static' model='dac' relabel='no'><label>+UID:+GID</label></seclabel>`.

Why relabel='no', with Shoal owning the files (probed on libvirt 9.0, Debian 12). With
relabel='yes' libvirt's DAC driver chowns every disk of the domain to its uid, the read-only
ones too: the shared root file system and the template's frozen data disk (the backing file of
every clone's overlay) would belong to whichever VM started last, which could then chmod and
write them; with remember_owner a second VM on the same file even fails to start ("Setting
different DAC user or group on ... which is already in use"). With relabel='no' libvirt leaves
every path of the domain alone and only chowns its own per-domain directory
(/var/lib/libvirt/qemu/domain-N-*, master-key.aes) to the domain's uid; that directory's
parent is 0750 libvirt-qemu, so it must be traversable (`ensure_libvirt_dirs`: o+x, names
only). Shoal itself then sets what the VM may open:
- its directory <instance_vm_dir>/vms/<key>/: root's, group the VM's gid, 0710. Only that VM
  (and root) may enter it, and not even that VM may add, remove or rename an entry: an escaped
  QEMU cannot swap its agent socket or console log for a link to another VM's, which the host
  (root) would then follow. In it the data disk overlay (0600, the VM's uid); the agent socket
  and the console log are opened by libvirtd and virtlogd (root) and handed to QEMU as
  descriptors, and are made 0600 and the VM's own once the domain is up;
- the guest image (kernel, initramfs, root file system) and a template's files: root-owned,
  0644 (the data disk QEMU reads as a backing file) or 0600 (the save image: libvirtd reads it
  as root and streams it to QEMU through a pipe); directories above them 0711.
A process running as one VM's uid can therefore open nothing of another VM's and no shared file
for writing (tests/integration/test_vm_identity.py proves it on real VMs).

Allocation. A uid is in use while a VM directory (or a template build directory) whose group
is its gid exists under any SHOAL_VM_DIR used on this host, or while any process runs under it.
`claim_dir` picks the lowest uid of the range used by neither and gives the new directory its
gid in one step, under a host-wide flock in HOST_REGISTRY, which also lists every SHOAL_VM_DIR
that ever claimed a uid here (instances with different VM directories share one range without
handing a uid out twice). The directory is the lease:
it outlives the domain (teardown destroys the domain first and removes the directory after), so
a uid is free again only once nothing of its last VM is left. Nothing is kept in memory, so
a worker that restarts, adopts running VMs or reconciles has nothing to rebuild.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from shoal.settings import Settings

LIBVIRT_QEMU_LIB = Path("/var/lib/libvirt/qemu")
# Host-wide, whatever SHOAL_VM_DIR each instance uses: the allocation lock and the VM dirs.
HOST_REGISTRY = Path("/var/lib/shoal-vm-uids")
LOCK_NAME = "lock"
VM_DIRS_NAME = "vm-dirs"
VM_DIR_MODE = 0o710  # root's; the VM's gid may enter it
VM_FILE_MODE = 0o600
SHARED_READ_MODE = 0o644


class NoFreeUid(RuntimeError):
    """Every uid of the configured range is in use on this host."""


@dataclass(frozen=True)
class VMIdentity:
    uid: int
    gid: int

    @property
    def label(self) -> str:
        """libvirt's DAC label: numeric ids, `+` so no name lookup happens."""
        return f"+{self.uid}:+{self.gid}"


def seclabel_element(identity: VMIdentity) -> ET.Element:
    seclabel = ET.Element("seclabel", type="static", model="dac", relabel="no")
    ET.SubElement(seclabel, "label").text = identity.label
    return seclabel


def set_seclabel(domain: ET.Element, identity: VMIdentity) -> None:
    """Replace the domain's DAC seclabel (a template's, in a clone's XML) with `identity`'s."""
    for existing in domain.findall("seclabel"):
        if existing.get("model") == "dac":
            domain.remove(existing)
    domain.append(seclabel_element(identity))


def identity_of(xml: str) -> VMIdentity | None:
    """The static DAC identity a domain definition carries, or None."""
    for seclabel in ET.fromstring(xml).findall("seclabel"):
        label = seclabel.findtext("label") or ""
        if seclabel.get("model") == "dac" and label.count(":") == 1:
            uid, gid = (part.lstrip("+") for part in label.split(":"))
            if uid.isdigit() and gid.isdigit():
                return VMIdentity(int(uid), int(gid))
    return None


def uid_range(settings: Settings) -> range:
    """Settings refuses a range that starts below 1000 or is empty."""
    return range(settings.vm_uid_base, settings.vm_uid_base + settings.vm_uid_count)


def _dir_groups(vm_dir: Path) -> set[int]:
    """Groups of every VM directory and template build directory under one SHOAL_VM_DIR (all
    instances sharing it): <vm_dir>/<instance>/vms/* and .../templates/.building-*."""
    groups: set[int] = set()
    for pattern in ("*/vms/*", "*/templates/.building-*"):
        for path in vm_dir.glob(pattern):
            with contextlib.suppress(OSError):
                groups.add(path.lstat().st_gid)
    return groups


def _process_uids(proc: Path = Path("/proc")) -> set[int]:
    """The real and effective uids of every live process."""
    uids: set[int] = set()
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("Uid:"):
                    uids.update(int(field) for field in line.split()[1:])
                    break
        except (OSError, ValueError):
            continue
    return uids


@contextlib.contextmanager
def _host_lock(registry: Path) -> Iterator[None]:
    registry.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(registry / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _registered_vm_dirs(registry: Path, vm_dir: Path) -> list[Path]:
    """Every SHOAL_VM_DIR that claimed a uid on this host and still exists (one that is gone
    holds no lease), `vm_dir` added. Called under the lock."""
    listing = registry / VM_DIRS_NAME
    try:
        listed = [Path(line) for line in listing.read_text().splitlines() if line]
    except FileNotFoundError:
        listed = []
    own = Path(os.path.realpath(vm_dir))
    known = [path for path in listed if path.is_dir() and path != own] + [own]
    if known != listed:
        partial = listing.with_name(f".{VM_DIRS_NAME}.new")
        partial.write_text("".join(f"{path}\n" for path in known))
        os.replace(partial, listing)
    return known


def pick_uid(candidates: range, used: Iterable[int]) -> int:
    taken = set(used)
    for uid in candidates:
        if uid not in taken:
            return uid
    raise NoFreeUid(
        f"all {len(candidates)} VM uids from {candidates.start} are in use on this host: "
        "raise SHOAL_VM_UID_COUNT"
    )


def claim_dir(
    settings: Settings,
    directory: Path,
    proc: Path = Path("/proc"),
    registry: Path = HOST_REGISTRY,
) -> VMIdentity:
    """Create `directory` (root's, 0710) for a uid no other VM on this host holds, its group
    that uid's gid; the identity. An existing `directory` is taken over."""
    vm_dir = Path(settings.vm_dir)
    vm_dir.mkdir(mode=0o711, parents=True, exist_ok=True)
    with _host_lock(registry):
        held = set().union(*(_dir_groups(d) for d in _registered_vm_dirs(registry, vm_dir)))
        uid = pick_uid(uid_range(settings), held | _process_uids(proc))
        directory.mkdir(mode=VM_DIR_MODE, exist_ok=True)
        os.chown(directory, 0, uid)
        os.chmod(directory, VM_DIR_MODE)
    return VMIdentity(uid, uid)


def give(path: Path, identity: VMIdentity, mode: int = VM_FILE_MODE) -> None:
    """Make `path` the VM's own, readable and writable by it alone."""
    os.chown(path, identity.uid, identity.gid, follow_symlinks=False)
    os.chmod(path, mode)


def make_shared_read_only(path: Path, mode: int = SHARED_READ_MODE) -> None:
    """A file every VM may read and none may write: root-owned, `mode` (no write bits for
    others). Skips the work when it is already so."""
    st = path.stat()
    if st.st_uid != 0 or st.st_gid != 0:
        os.chown(path, 0, 0)
    if stat.S_IMODE(st.st_mode) != mode:
        os.chmod(path, mode)


def ensure_libvirt_dirs(lib_dir: Path = LIBVIRT_QEMU_LIB) -> None:
    """libvirt chowns each domain's private directory (its master key) to the domain's uid,
    but its parent is 0750 libvirt-qemu: let every uid traverse it (not list it)."""
    with contextlib.suppress(FileNotFoundError):
        mode = stat.S_IMODE(lib_dir.stat().st_mode)
        if not mode & 0o001:
            os.chmod(lib_dir, mode | 0o001)


def kvm_device_problem(device: Path = Path("/dev/kvm")) -> str | None:
    """Under KVM each QEMU must open /dev/kvm, and the per-VM uids are in no `kvm` group: the
    device must be open to all (0666, systemd's default). What is wrong, or None."""
    try:
        mode = stat.S_IMODE(device.stat().st_mode)
    except OSError as exc:
        return f"{device}: {exc.strerror}"
    if mode & 0o006 != 0o006:
        return (
            f"{device} is mode {mode:o}: QEMU under a per-VM uid (in no kvm group) cannot open "
            "it; make it 0666"
        )
    return None
