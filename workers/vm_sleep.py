"""A VM put to sleep and woken again (issue 15): the machine under a session that idles.

Sleep saves the running domain with libvirt (`virDomainSave`: guest memory and device state
into one image; QEMU then exits), and keeps the VM's directory as it is: its data disk overlay
(the guest's files), its transfer disk and the uid lease the directory holds
(workers/vm_identity.py), so the woken VM runs as the same uid on the same files. Wake restores
the image under the same name, paused, confines it as every start does, resumes it and reseeds
the guest's clock and entropy (as after any restore); the image is removed only once the session
is recorded awake (workers/host_sleep.py), so a wake cut short can be finished or tried again.

Images. `<instance_vm_dir>/sleeping/<key>.save`, written by libvirtd (root) and made 0600; the
directory is root's, 0700: no VM's uid can enter it, so no guest reads another's memory. An
image is the whole of the guest's memory as it stood, not the template's share of it: a clone
that ran on its template's memory (workers/shared_memory.py) is woken as an ordinary VM, the
memory broker's wrapper taken out of its definition.
"""

from __future__ import annotations

import contextlib
import os
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import libvirt

from workers import domain as dom
from workers import qemu_wrapper, shared_memory
from workers.agent_client import AgentClient
from workers.vm_domains import DomainOps
from workers.vm_errors import VMError
from workers.vm_identity import VMIdentity

DIR_MODE = 0o700
IMAGE_MODE = 0o600
WRAPPER_ENV = ("SHOAL_QEMU", "SHOAL_MEMORY_SOCKET", "SHOAL_MEMORY_INCOMING")


@dataclass(frozen=True)
class SleepImage:
    path: Path
    bytes: int
    seconds: float


def private_dir(path: Path) -> None:
    """`path` made root's and 0700 (no VM's uid may enter)."""
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    os.chown(path, 0, 0)
    os.chmod(path, DIR_MODE)


def without_wrapper(xml: str) -> str:
    """The definition of a clone that ran on its template's memory, made an ordinary VM's: the
    real emulator back, the wrapper's environment gone (workers/shared_memory.py)."""
    domain = ET.fromstring(xml)
    commandline = domain.find(f"{{{dom.QEMU_NS}}}commandline")
    if commandline is None:
        return xml
    env = {e.get("name"): e.get("value") for e in commandline.findall(f"{{{dom.QEMU_NS}}}env")}
    if "SHOAL_MEMORY_SOCKET" not in env:
        return xml
    emulator = domain.find("devices/emulator")
    if emulator is not None:
        emulator.text = env.get("SHOAL_QEMU") or qemu_wrapper.QEMU
    for entry in commandline.findall(f"{{{dom.QEMU_NS}}}env"):
        if entry.get("name") in WRAPPER_ENV:
            commandline.remove(entry)
    if not len(commandline):
        domain.remove(commandline)
    return ET.tostring(domain, encoding="unicode")


def save(domains: DomainOps, name: str, image: Path) -> SleepImage:
    """Save the running domain `name` to `image`; the domain is gone afterwards. A save that
    fails with the domain still running leaves no image (libvirt resumes the domain)."""
    private_dir(image.parent)
    started = time.monotonic()
    xml = domains.libvirt.call(f"read {name}", lambda c: c.lookupByName(name).XMLDesc(0))
    if without_wrapper(xml) != xml:  # a clone started with x-ignore-shared: save every page
        shared_memory.qmp(
            domains.libvirt, name, "migrate-set-capabilities", shared_memory.SAVE_ALL_MEMORY
        )
    try:
        domains.libvirt.call(
            f"save {name}",
            lambda c: c.lookupByName(name).saveFlags(str(image), None, 0),
            retry=False,
        )
    except BaseException:
        # Still running: the save did not happen, its partial image goes. Gone (libvirt
        # finished, then the call failed): the image may be whole, and it is all there is.
        with contextlib.suppress(Exception):
            if domains.is_active(name):
                image.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):
        os.chown(image, 0, 0)
        os.chmod(image, IMAGE_MODE)
    with contextlib.suppress(Exception):
        domains.probes.remove_limits(name)  # its cgroups outlive QEMU; wake makes new ones
    return SleepImage(image, image.stat().st_size, time.monotonic() - started)


def restore(
    domains: DomainOps,
    who: str,
    name: str,
    paths: dom.VMPaths,
    image: Path,
    identity: VMIdentity,
    memory_mib: int,
    timeout: float,
) -> AgentClient:
    """Wake the domain saved in `image`: running, confined, its agent connected and reseeded.
    The image is kept (the caller removes it once the session is recorded awake). On failure
    the domain is destroyed; the image stays, so a later wake may try again."""
    xml = domains.libvirt.call(f"read {image.name}", lambda c: c.saveImageGetXMLDesc(str(image), 0))
    try:
        domains.libvirt.call(
            f"wake {name}",
            lambda c: c.restoreFlags(
                str(image), without_wrapper(xml), libvirt.VIR_DOMAIN_SAVE_PAUSED
            ),
            retry=False,
        )
        domains.run_confined(name, paths, identity, memory_mib)
        agent, _hello = domains.await_agent(who, name, paths, timeout)
        domains.reseed(who, agent, "woken")
    except (VMError, OSError):
        domains.destroy_domain(name)
        domains.probes.remove_limits(name)
        raise
    return agent
