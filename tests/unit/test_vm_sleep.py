"""The pure parts of sleeping VMs (workers/vm_sleep.py); the rest runs on real VMs in
tests/integration/test_vm_driver.py."""

from __future__ import annotations

import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

from shoal.settings import Settings
from workers import domain as dom
from workers import qemu_wrapper, shared_memory, sleep_images, vm_sleep

PLAIN = """<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>shoal-abcd1234-host-0123456789ab</name>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator></devices>
  <qemu:capabilities><qemu:del capability='cpu-unavailable-features'/></qemu:capabilities>
</domain>"""


def test_a_clone_on_template_memory_wakes_as_an_ordinary_vm():
    wrapped = shared_memory.with_wrapper(PLAIN, Path("/run/shoal/memory.sock"), incoming=True)
    assert "SHOAL_MEMORY_SOCKET" in wrapped
    plain = ET.fromstring(vm_sleep.without_wrapper(wrapped))
    assert plain.findtext("devices/emulator") == qemu_wrapper.QEMU
    assert plain.find(f"{{{dom.QEMU_NS}}}commandline") is None
    assert plain.find(f"{{{dom.QEMU_NS}}}capabilities") is not None  # the rest is kept


def test_other_environment_and_plain_definitions_are_left_alone():
    assert vm_sleep.without_wrapper(PLAIN) == PLAIN
    wrapped = shared_memory.with_wrapper(PLAIN, Path("/s.sock"), incoming=False)
    root = ET.fromstring(wrapped)
    commandline = root.find(f"{{{dom.QEMU_NS}}}commandline")
    ET.SubElement(commandline, f"{{{dom.QEMU_NS}}}env", name="OTHER", value="1")
    kept = ET.fromstring(vm_sleep.without_wrapper(ET.tostring(root, encoding="unicode")))
    names = [e.get("name") for e in kept.iter(f"{{{dom.QEMU_NS}}}env")]
    assert names == ["OTHER"]


def test_images_live_in_the_instances_own_directory(tmp_path):
    settings = Settings(vm_dir=str(tmp_path), instance="abcd1234")
    path = sleep_images.image_path(settings, "0123456789ab")
    assert path == tmp_path / "abcd1234" / "sleeping" / "0123456789ab.save"
    assert path.parent != dom.vms_dir(settings)  # not where a VM's uid may enter


def test_the_templates_a_sleeping_vm_or_a_fork_base_needs_are_read_from_its_disk(tmp_path):
    settings = Settings(vm_dir=str(tmp_path), instance="abcd1234")
    base = tmp_path / "template-data.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "1M"], check=True)
    paths = dom.vm_paths(settings, "0123456789ab")
    paths.dir.mkdir(parents=True)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2",
         str(paths.data_disk)],
        check=True,
    )  # fmt: skip
    assert sleep_images.backing_file(paths.data_disk) == str(base)
    assert sleep_images.backing_file(base) is None
    assert sleep_images.needed_backing_files(settings) == set()  # awake: nothing held
    sleep_images.sleep_dir(settings).mkdir()
    sleep_images.image_path(settings, "0123456789ab").write_bytes(b"image")
    assert sleep_images.needed_backing_files(settings) == {str(base)}
    sleep_images.image_path(settings, "0123456789ab").unlink()
    frozen = settings.instance_vm_dir / "forking-0a1b2c3d" / "0123456789ab-00aa11bb"
    frozen.mkdir(parents=True)
    paths.data_disk.rename(frozen / "data.qcow2")  # a fork base's frozen disk holds it too
    assert sleep_images.needed_backing_files(settings) == {str(base)}
    (tmp_path / "garbage.qcow2").write_bytes(b"QFI\xfb" + b"\xff" * 60)
    assert sleep_images.backing_file(tmp_path / "garbage.qcow2") is None
