"""Names, file paths and libvirt domain XML of Shoal's VMs.

Names. Every domain is `shoal-<instance>-<host>-<key>`: a host only ever touches domains that
carry its own prefix, so two instances or two hosts sharing a libvirtd never meet. `<key>` is
12 characters: a VM's is the first 12 hex digits of sha256(VM id) (ids can be long or hold any
character); a snapshot template's is `t` and 11 hex digits. A template and its clones therefore
have names of the same length, which the save-image rewrite in workers/templates.py needs.

Files. Each VM owns one directory, <instance_vm_dir>/vms/<key>/, holding its data disk overlay,
its transfer disk, its agent socket and its console log; the directory is root's with the VM's
own gid, 0710 (the VM may enter it but not change its entries, workers/vm_identity.py), its
files are the VM's uid's, 0600, but for the transfer disk (root's, 0640); destroying the VM
removes the directory. Every directory above it is 0711 and root's, so each VM's QEMU can
traverse to its own.

XML. `domain_xml()` builds the whole definition from a `DomainSpec`; `retarget_xml()` turns a
template's saved definition into a clone's (name, uuid, disks, socket, console, metadata, and
its own uid: never the template's).

What a guest gets, and why:
- direct kernel boot (<kernel>, <initrd>, <cmdline>), no firmware disk boot;
- vda: the image's root ext4, read-only, shared by every VM; vdb: the VM's own qcow2 overlay;
  vdc: its transfer disk, a raw file read-only to the guest that uploads' bytes come in by
  (workers/transfer_disk.py; root's, the VM's group may read it, 0640);
- one virtio-serial channel, org.shoal.agent.0, bound to a unix socket the host connects to;
- ttyS0 written to a console log file. libvirt hands file chardevs to virtlogd
  (qemu.conf stdio_handler = "logd", the default), which rotates the file at its max_size
  (virtlogd.conf, default 2 MiB, keeping max_backups = 3 old files as console.log.N; checked
  here with a guest writing 3 MB): a guest cannot fill the host's disk through its console, at
  most (1 + max_backups) x max_size per VM (set max_size in virtlogd.conf for another cap).
  The start error of a guest whose
  agent never answers quotes the console's last 1.5 KB; destroying the VM removes its
  directory, rotated files included;
- no network interface unless the spec asks for one (then QEMU user-mode networking:
  egress only, no host setup); no USB controller, sound, graphics or balloon;
- <acpi/> and <apic/> so an idle guest goes tickless (~1% of a core under TCG instead of ~9%);
- under TCG a translation cache of settings.tb_cache_mib (QEMU reserves 1 GiB otherwise);
- crash, reboot and power-off all destroy the domain: a VM never comes back
  by itself with its state reset;
- a CPU cap: <cputune> global_period/global_quota (whole QEMU process; by default its vCPU
  count, settings.vm_cpu_cap), only where the cgroup cpu controller exists
  (workers/cgroups.py). Memory and pids limits have no XML that works here: the worker writes
  them into the domain's cgroups (workers/cgroups.py, workers/vm_domains.py);
- <iotune> on the writable data disk (settings.vm_disk_bytes_per_s, vm_disk_iops): QEMU
  throttles it itself, without any cgroup;
- <seclabel type='static' model='dac' relabel='no'> with the VM's own uid and gid
  (workers/vm_identity.py says why relabel is off and who owns what).
QEMU runs as that unprivileged per-VM uid, never libvirt-qemu or root, inside QEMU's seccomp
sandbox (qemu.conf seccomp_sandbox, 1 by default: `-sandbox on,obsolete=deny,
elevateprivileges=deny,spawn=deny,resourcecontrol=deny`, a libvirt default this module relies
on); the integration tests check both on running VMs.
"""

from __future__ import annotations

import hashlib
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from shoal.protocol import CHANNEL_NAME, TRANSFER_DISK_SERIAL
from shoal.settings import Settings
from workers import transfer_disk
from workers.vm_identity import VMIdentity, set_seclabel

KEY_LEN = 12
_VM_KEY = re.compile(r"^[0-9a-f]{12}$")
_TEMPLATE_KEY = re.compile(r"^t[0-9a-f]{11}$")
METADATA_NS = "urn:shoal:vm:1"
ET.register_namespace("shoal", METADATA_NS)
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
ET.register_namespace("qemu", QEMU_NS)
# QEMU 7.2 can list a vCPU's features only one QOM property per monitor command: with this
# capability libvirt 9 reads the ~400 of them one by one at every start and restore (~330 ms of
# QEMU's and libvirtd's CPU before the guest runs); without it, it reads x86's two feature-word
# properties instead, which tell it the same.
SLOW_CPU_PROBE = "cpu-unavailable-features"

TRANSFER_DISK_DEV = "vdc"
DIR_MODE = 0o711
# A unix socket path must fit in sun_path (108 bytes with its NUL).
MAX_SOCKET_PATH = 107


def _sanitise(text: str, max_len: int) -> str:
    cleaned = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return cleaned[:max_len].strip("-")


def name_prefix(settings: Settings) -> str:
    """`shoal-<instance>-<host>-`: every domain of this instance on this host starts so."""
    instance = _sanitise(settings.instance_id, 16) or "default"
    host = _sanitise(settings.host_name, 24) or "host"
    return f"shoal-{instance}-{host}-"


def vm_key(vm_id: str) -> str:
    """The key in the names of VM `vm_id`'s domain and directory."""
    return hashlib.sha256(vm_id.encode()).hexdigest()[:KEY_LEN]


def domain_name(settings: Settings, key: str) -> str:
    return name_prefix(settings) + key


def key_of(settings: Settings, name: str) -> str | None:
    """The key of one of our domain names, or None if the name is not this host's."""
    prefix = name_prefix(settings)
    if not name.startswith(prefix):
        return None
    key = name[len(prefix) :]
    if _VM_KEY.match(key) or _TEMPLATE_KEY.match(key):
        return key
    return None


def is_template_key(key: str) -> bool:
    return bool(_TEMPLATE_KEY.match(key))


def make_dirs(path: Path, top: Path) -> None:
    """Create `path` and its parents up to and including `top`, each 0711 (root-owned,
    traversable by every VM's uid, listable by none)."""
    path = Path(path)
    chain = [path, *path.parents]
    for directory in reversed(chain):
        if directory != top and top not in directory.parents:
            continue
        directory.mkdir(mode=DIR_MODE, exist_ok=True)
        if directory.stat().st_mode & 0o711 != 0o711:
            os.chmod(directory, directory.stat().st_mode | 0o711)


@dataclass(frozen=True)
class VMPaths:
    """The files of one VM, all inside one directory."""

    dir: Path

    @property
    def data_disk(self) -> Path:
        return self.dir / "data.qcow2"

    @property
    def transfer_disk(self) -> Path:
        """Root's, read-only to the VM: uploads on their way in (workers/transfer_disk.py)."""
        return self.dir / transfer_disk.FILE_NAME

    @property
    def socket(self) -> Path:
        return self.dir / "agent.sock"

    @property
    def console_log(self) -> Path:
        return self.dir / "console.log"

    @property
    def host_marker(self) -> Path:
        """Root's: the name of the host worker whose VM this is. Host workers of one instance
        on one machine (tests, a split deployment) share vms/; each sweeps only its own."""
        return self.dir / "host"

    @property
    def restore_image(self) -> Path:
        """A clone's private copy of the template's save image, removed once restored."""
        return self.dir / "restore.save"


def vms_dir(settings: Settings) -> Path:
    return settings.instance_vm_dir / "vms"


def vm_paths(settings: Settings, key: str) -> VMPaths:
    paths = VMPaths(vms_dir(settings) / key)
    if len(str(paths.socket)) > MAX_SOCKET_PATH:
        raise ValueError(
            f"agent socket path {paths.socket} is longer than {MAX_SOCKET_PATH} bytes: "
            "choose a shorter SHOAL_VM_DIR"
        )
    return paths


def qemu_log_files(name: str, log_dir: Path = Path("/var/log/libvirt/qemu")) -> list[Path]:
    """libvirt's own per-domain log (QEMU's stderr), which outlives the domain unless removed."""
    try:
        return sorted(p for p in log_dir.iterdir() if p.name.startswith(name + ".log"))
    except OSError:
        return []


@dataclass(frozen=True)
class DomainSpec:
    """Everything one domain definition needs, with paths resolved."""

    name: str
    uuid: str
    accel: str  # "kvm" or "tcg"
    vcpus: int
    memory_mib: int
    kernel: Path
    initrd: Path
    cmdline: str
    rootfs: Path
    data_disk: Path
    transfer_disk: Path
    agent_socket: Path
    console_log: Path
    rootfs_format: str = "raw"
    data_disk_format: str = "qcow2"
    tb_cache_mib: int = 64
    cpu_quota: float = 0.0  # cores for the whole QEMU process; 0: no cap
    disk_bytes_per_s: int = 0  # data disk throttle; 0: none
    disk_iops: int = 0
    identity: VMIdentity | None = None  # the uid/gid QEMU runs as (None: libvirt's default)
    network: bool = False
    metadata: Mapping[str, str] = field(default_factory=dict)


CPU_PERIOD_US = 100_000


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    element = ET.SubElement(parent, tag, {k.rstrip("_"): v for k, v in attrs.items()})
    if text is not None:
        element.text = text
    return element


def _metadata(parent: ET.Element, values: Mapping[str, str]) -> None:
    vm = _sub(_sub(parent, "metadata"), f"{{{METADATA_NS}}}vm")
    for key, value in sorted(values.items()):
        vm.set(key, str(value))


def domain_xml(spec: DomainSpec) -> str:
    if spec.accel not in ("kvm", "tcg"):
        raise ValueError(f"accel must be kvm or tcg, not {spec.accel!r}")
    domain = ET.Element("domain", type="kvm" if spec.accel == "kvm" else "qemu")
    _sub(domain, "name", spec.name)
    _sub(domain, "uuid", spec.uuid)
    _metadata(domain, spec.metadata)
    _sub(domain, "memory", str(spec.memory_mib), unit="MiB")
    # Guest RAM never marked mergeable (QEMU's mem-merge=off): were the operator to turn on KSM
    # for other work, pages still would not be merged across tenants (a side channel).
    _sub(_sub(domain, "memoryBacking"), "nosharepages")
    _sub(domain, "vcpu", str(spec.vcpus), placement="static")
    if spec.cpu_quota > 0:
        cputune = _sub(domain, "cputune")
        _sub(cputune, "global_period", str(CPU_PERIOD_US))
        _sub(cputune, "global_quota", str(max(1000, int(spec.cpu_quota * CPU_PERIOD_US))))

    os_ = _sub(domain, "os")
    _sub(os_, "type", "hvm", arch="x86_64", machine="pc")
    _sub(os_, "kernel", str(spec.kernel))
    _sub(os_, "initrd", str(spec.initrd))
    _sub(os_, "cmdline", spec.cmdline)

    features = _sub(domain, "features")
    _sub(features, "acpi")
    _sub(features, "apic")
    if spec.accel == "tcg":
        tcg = _sub(features, "tcg")
        _sub(tcg, "tb-cache", str(spec.tb_cache_mib), unit="MiB")
    if spec.accel == "kvm":
        _sub(domain, "cpu", mode="host-passthrough", check="none", migratable="on")
    _sub(domain, "clock", offset="utc")
    _sub(domain, "on_poweroff", "destroy")
    _sub(domain, "on_reboot", "destroy")
    _sub(domain, "on_crash", "destroy")
    pm = _sub(domain, "pm")
    _sub(pm, "suspend-to-mem", enabled="no")
    _sub(pm, "suspend-to-disk", enabled="no")

    devices = _sub(domain, "devices")
    root = _sub(devices, "disk", type="file", device="disk")
    _sub(root, "driver", name="qemu", type=spec.rootfs_format)
    _sub(root, "source", file=str(spec.rootfs))
    _sub(root, "target", dev="vda", bus="virtio")
    _sub(root, "readonly")
    data = _sub(devices, "disk", type="file", device="disk")
    _sub(data, "driver", name="qemu", type=spec.data_disk_format, discard="unmap")
    _sub(data, "source", file=str(spec.data_disk))
    _sub(data, "target", dev="vdb", bus="virtio")
    if spec.disk_bytes_per_s > 0 or spec.disk_iops > 0:
        iotune = _sub(data, "iotune")
        if spec.disk_bytes_per_s > 0:
            _sub(iotune, "total_bytes_sec", str(spec.disk_bytes_per_s))
        if spec.disk_iops > 0:
            _sub(iotune, "total_iops_sec", str(spec.disk_iops))
    transfer = _sub(devices, "disk", type="file", device="disk")
    _sub(transfer, "driver", name="qemu", type="raw")
    _sub(transfer, "source", file=str(spec.transfer_disk))
    _sub(transfer, "target", dev=TRANSFER_DISK_DEV, bus="virtio")
    _sub(transfer, "serial", TRANSFER_DISK_SERIAL)
    _sub(transfer, "readonly")
    _sub(devices, "controller", type="usb", model="none")
    if spec.network:
        interface = _sub(devices, "interface", type="user")
        _sub(interface, "model", type="virtio")
    serial = _sub(devices, "serial", type="file")
    _sub(serial, "source", path=str(spec.console_log), append="off")
    _sub(serial, "target", port="0")
    channel = _sub(devices, "channel", type="unix")
    _sub(channel, "source", mode="bind", path=str(spec.agent_socket))
    _sub(channel, "target", type="virtio", name=CHANNEL_NAME)
    _sub(devices, "memballoon", model="none")
    if spec.identity is not None:
        set_seclabel(domain, spec.identity)
    capabilities = _sub(domain, f"{{{QEMU_NS}}}capabilities")
    _sub(capabilities, f"{{{QEMU_NS}}}del", capability=SLOW_CPU_PROBE)
    return ET.tostring(domain, encoding="unicode")


def _disk_source(domain: ET.Element, dev: str) -> ET.Element:
    """The <source> of disk `dev`, its saved <backingStore> dropped (libvirt re-probes the
    clone's own chain)."""
    for disk in domain.findall("devices/disk"):
        target = disk.find("target")
        source = disk.find("source")
        if target is not None and target.get("dev") == dev and source is not None:
            backing = disk.find("backingStore")
            if backing is not None:
                disk.remove(backing)
            return source
    raise ValueError(f"template domain XML has no {dev} disk")


def retarget_xml(
    xml: str,
    *,
    name: str,
    uuid: str,
    data_disk: Path,
    transfer_disk: Path,
    agent_socket: Path,
    console_log: Path,
    metadata: Mapping[str, str],
    identity: VMIdentity,
) -> str:
    """A template's saved definition, made a clone's: its own name, uuid, data disk overlay,
    transfer disk, agent socket, console log, metadata and uid/gid (the template's seclabel is
    replaced). Everything that is guest ABI stays as saved."""
    domain = ET.fromstring(xml)

    def one(path: str) -> ET.Element:
        found = domain.find(path)
        if found is None:
            raise ValueError(f"template domain XML has no {path}")
        return found

    one("name").text = name
    one("uuid").text = uuid
    metadata_element = domain.find("metadata")
    if metadata_element is None:
        metadata_element = ET.Element("metadata")
        domain.insert(list(domain).index(one("uuid")) + 1, metadata_element)
    for child in metadata_element.findall(f"{{{METADATA_NS}}}vm"):
        metadata_element.remove(child)
    vm = ET.SubElement(metadata_element, f"{{{METADATA_NS}}}vm")
    for key, value in sorted(metadata.items()):
        vm.set(key, str(value))

    for dev, path in (("vdb", data_disk), (TRANSFER_DISK_DEV, transfer_disk)):
        _disk_source(domain, dev).set("file", str(path))

    channel_source = None
    for channel in domain.findall("devices/channel"):
        target = channel.find("target")
        if target is not None and target.get("name") == CHANNEL_NAME:
            channel_source = channel.find("source")
    if channel_source is None:
        raise ValueError(f"template domain XML has no {CHANNEL_NAME} channel")
    channel_source.set("path", str(agent_socket))

    for tag in ("serial", "console"):
        for chardev in domain.findall(f"devices/{tag}"):
            if chardev.get("type") == "file":
                source = chardev.find("source")
                if source is not None:
                    source.set("path", str(console_log))
    set_seclabel(domain, identity)
    return ET.tostring(domain, encoding="unicode")


def read_metadata(xml: str) -> dict[str, str]:
    """The Shoal metadata attributes of a domain definition ({} when there are none)."""
    domain = ET.fromstring(xml)
    element = domain.find(f"metadata/{{{METADATA_NS}}}vm")
    return dict(element.attrib) if element is not None else {}
