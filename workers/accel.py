"""Choose how guests run: KVM where hardware virtualization really works, TCG otherwise.

The cheap test is the one host.md recommends: a `vmx` or `svm` flag in /proc/cpuinfo *and* a
/dev/kvm this process can open that answers KVM_GET_API_VERSION and KVM_CREATE_VM. A /dev/kvm
without the flags (a paravirtual hypervisor such as kvm_pvm) starts guests that crawl, so it
does not count. When libvirt's capabilities are known, libvirt must also offer the `kvm`
domain type: a libvirtd started with /dev/kvm hidden (the start-up trick in host.md) cannot.

The setting `accel` is auto, kvm or tcg; the choice always comes with a reason, for the logs
and /healthz. TCG is not a hardware isolation boundary (QEMU does not treat it as a security
boundary): with SHOAL_REQUIRE_KVM=1 the worker refuses to start where KVM is not usable
(kvm_refusal; workers/tasks.py and `shoal up` call it).
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import asdict, dataclass

from shoal.settings import Settings

KVM = "kvm"
TCG = "tcg"
SETTINGS = ("auto", KVM, TCG)

_KVM_GET_API_VERSION = 0xAE00
_KVM_CREATE_VM = 0xAE01
_KVM_API_VERSION = 12


@dataclass(frozen=True)
class AccelChoice:
    kind: str  # "kvm" or "tcg"
    reason: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def cpu_has_hw_virt(cpuinfo_path: str = "/proc/cpuinfo") -> bool:
    try:
        with open(cpuinfo_path) as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return "vmx" in flags or "svm" in flags
    except OSError:
        return False
    return False


def kvm_device_usable(path: str = "/dev/kvm") -> tuple[bool, str]:
    """Open the device and ask it for its API version and one VM; (usable, why not)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return False, f"{path} cannot be opened: {exc.strerror}"
    try:
        version = fcntl.ioctl(fd, _KVM_GET_API_VERSION, 0)
        if version != _KVM_API_VERSION:
            return False, f"{path} speaks KVM API {version}, not {_KVM_API_VERSION}"
        vm_fd = fcntl.ioctl(fd, _KVM_CREATE_VM, 0)
        os.close(vm_fd)
    except OSError as exc:
        return False, f"{path} refused a test VM: {exc.strerror}"
    finally:
        os.close(fd)
    return True, ""


def detect(
    setting: str = "auto",
    libvirt_has_kvm: bool | None = None,
    cpuinfo_path: str = "/proc/cpuinfo",
    kvm_path: str = "/dev/kvm",
) -> AccelChoice:
    """Decide between KVM and TCG. `libvirt_has_kvm` is None when libvirt was not asked."""
    if setting not in SETTINGS:
        raise ValueError(f"SHOAL_ACCEL={setting!r}: expected one of {', '.join(SETTINGS)}")
    if setting == TCG:
        return AccelChoice(TCG, "forced by SHOAL_ACCEL=tcg")
    if setting == KVM:
        return AccelChoice(KVM, "forced by SHOAL_ACCEL=kvm (not checked)")
    if not cpu_has_hw_virt(cpuinfo_path):
        present = (
            " (it exists, but guests crawl without VT-x/AMD-V)" if os.path.exists(kvm_path) else ""
        )
        return AccelChoice(
            TCG, f"no vmx/svm flag in {cpuinfo_path}: KVM not usable{present}; using TCG"
        )
    usable, why = kvm_device_usable(kvm_path)
    if not usable:
        return AccelChoice(TCG, f"{why}; using TCG")
    if libvirt_has_kvm is False:
        return AccelChoice(
            TCG,
            "the CPU and /dev/kvm support KVM but libvirtd does not offer the kvm domain type "
            "(started with /dev/kvm hidden?); using TCG",
        )
    return AccelChoice(KVM, f"vmx/svm in {cpuinfo_path} and a working {kvm_path}")


def libvirt_offers_kvm(capabilities_xml: str) -> bool:
    """Whether `virsh capabilities` lists a kvm domain type for x86_64 guests."""
    import xml.etree.ElementTree as ET

    root = ET.fromstring(capabilities_xml)
    return any(
        d.get("type") == KVM
        for guest in root.findall("guest")
        for d in guest.findall("arch/domain")
    )


def kvm_refusal(
    setting: str,
    libvirt_has_kvm: bool | None,
    cpuinfo_path: str = "/proc/cpuinfo",
    kvm_path: str = "/dev/kvm",
) -> str | None:
    """Why a worker under SHOAL_REQUIRE_KVM=1 must not start (None: KVM is usable). The check is
    detect()'s own, also under SHOAL_ACCEL=kvm, which detect() takes on trust: a requirement is
    verified, not assumed."""
    if setting == TCG:
        return (
            "SHOAL_REQUIRE_KVM=1 and SHOAL_ACCEL=tcg contradict each other: guests would run "
            "under TCG, not a hardware isolation boundary; refusing to start"
        )
    choice = detect("auto", libvirt_has_kvm, cpuinfo_path, kvm_path)
    if choice.kind == KVM:
        return None
    return (
        f"SHOAL_REQUIRE_KVM=1 but KVM is not usable on this host: "
        f"{choice.reason.removesuffix('; using TCG')}. Guests would "
        "run under TCG, QEMU's software CPU, which is not a hardware isolation boundary; refusing "
        "to start (unset SHOAL_REQUIRE_KVM to run under TCG anyway)"
    )


def required_kvm_refusal(settings: Settings) -> str | None:
    """kvm_refusal for this host when SHOAL_REQUIRE_KVM=1 (asking libvirt whether it offers the
    kvm domain type when the CPU could); None when KVM is not required or is usable."""
    if not settings.require_kvm:
        return None
    offers_kvm = None
    if settings.accel != TCG and cpu_has_hw_virt():
        from workers import libvirt_conn

        caps = libvirt_conn.connection().call("capabilities", lambda c: c.getCapabilities())
        offers_kvm = libvirt_offers_kvm(caps)
    return kvm_refusal(settings.accel, offers_kvm)
