"""The VM driver's pure parts: domain XML, names, clone retargeting, the save-image rewrite,
accelerator choice and the cgroup probe. No libvirt, no QEMU."""

from __future__ import annotations

import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from shoal import protocol
from shoal.protocol import CHANNEL_NAME
from shoal.settings import Settings
from workers import accel, cgroups, domain, templates
from workers.vm_errors import TemplateError
from workers.vm_identity import VMIdentity, identity_of

UUID = "0b5c1d9e-3f59-4d9e-9a43-2b7e0f6c1a11"


def make_spec(**overrides) -> domain.DomainSpec:
    base = Path("/var/lib/shoal/abcd1234/vms/0123456789ab")
    values = dict(
        name="shoal-abcd1234-host-0123456789ab",
        uuid=UUID,
        accel="tcg",
        vcpus=2,
        memory_mib=768,
        kernel=Path("/var/cache/shoal/images/python-x/vmlinuz"),
        initrd=Path("/var/cache/shoal/images/python-x/initrd.img"),
        cmdline="console=ttyS0 root=/dev/vda ro shoal.tmp_mib=256",
        rootfs=Path("/var/cache/shoal/images/python-x/rootfs.ext4"),
        data_disk=base / "data.qcow2",
        transfer_disk=base / "transfer.img",
        agent_socket=base / "agent.sock",
        console_log=base / "console.log",
        tb_cache_mib=48,
        metadata={"session": "s-1", "restored": "0"},
    )
    values.update(overrides)
    return domain.DomainSpec(**values)


def parse(spec: domain.DomainSpec) -> ET.Element:
    return ET.fromstring(domain.domain_xml(spec))


def disk(root: ET.Element, dev: str) -> ET.Element:
    (found,) = [d for d in root.findall("devices/disk") if d.find("target").get("dev") == dev]
    return found


# --- domain XML ------------------------------------------------------------------------------


def test_identity_and_limits():
    root = parse(make_spec())
    assert root.get("type") == "qemu"
    assert root.findtext("name") == "shoal-abcd1234-host-0123456789ab"
    assert root.findtext("uuid") == UUID
    memory = root.find("memory")
    assert (memory.text, memory.get("unit")) == ("768", "MiB")
    assert root.findtext("vcpu") == "2"
    assert root.find("cputune") is None  # no quota asked
    assert domain.read_metadata(domain.domain_xml(make_spec())) == {
        "session": "s-1",
        "restored": "0",
    }


def test_no_network_no_usb_no_balloon_no_graphics():
    root = parse(make_spec())
    devices = root.find("devices")
    assert devices.find("interface") is None
    for absent in ("graphics", "sound", "video", "input", "hostdev", "rng"):
        assert devices.find(absent) is None, absent
    (usb,) = devices.findall("controller[@type='usb']")
    assert usb.get("model") == "none"
    assert devices.find("memballoon").get("model") == "none"


def test_guest_ram_is_never_marked_mergeable():
    """KSM, were the operator to run it, must not merge pages across tenants."""
    (backing,) = parse(make_spec()).findall("memoryBacking")
    assert backing.find("nosharepages") is not None


def test_libvirt_reads_the_vcpu_features_in_two_commands_not_four_hundred():
    root = parse(make_spec())
    (capabilities,) = root.findall(f"{{{domain.QEMU_NS}}}capabilities")
    (removed,) = capabilities.findall(f"{{{domain.QEMU_NS}}}del")
    assert removed.get("capability") == "cpu-unavailable-features"


def test_network_only_when_asked():
    interface = parse(make_spec(network=True)).find("devices/interface")
    assert interface.get("type") == "user"
    assert interface.find("model").get("type") == "virtio"


def test_direct_kernel_boot():
    os_ = parse(make_spec()).find("os")
    assert os_.findtext("kernel").endswith("/vmlinuz")
    assert os_.findtext("initrd").endswith("/initrd.img")
    assert "shoal.tmp_mib=256" in os_.findtext("cmdline")
    assert os_.find("type").get("arch") == "x86_64"


def test_root_is_read_only_vda_and_data_is_vdb_overlay():
    root = parse(make_spec())
    vda = disk(root, "vda")
    assert vda.find("readonly") is not None
    assert vda.find("target").get("bus") == "virtio"
    assert vda.find("driver").get("type") == "raw"
    assert vda.find("source").get("file").endswith("rootfs.ext4")
    vdb = disk(root, "vdb")
    assert vdb.find("readonly") is None
    assert vdb.find("driver").get("type") == "qcow2"
    assert vdb.find("source").get("file").endswith("/0123456789ab/data.qcow2")


def test_transfer_disk_is_read_only_vdc_found_by_its_serial_and_unthrottled():
    vdc = disk(parse(make_spec(disk_bytes_per_s=1 << 20)), "vdc")
    assert vdc.find("readonly") is not None
    assert vdc.find("driver").get("type") == "raw"
    assert vdc.findtext("serial") == protocol.TRANSFER_DISK_SERIAL
    assert vdc.find("source").get("file").endswith("/0123456789ab/transfer.img")
    assert vdc.find("iotune") is None


def test_agent_channel_and_console():
    devices = parse(make_spec()).find("devices")
    (channel,) = devices.findall("channel")
    assert channel.get("type") == "unix"
    assert channel.find("source").get("mode") == "bind"
    assert channel.find("source").get("path").endswith("/0123456789ab/agent.sock")
    assert channel.find("target").attrib == {"type": "virtio", "name": CHANNEL_NAME}
    (serial,) = devices.findall("serial")
    assert serial.get("type") == "file"
    assert serial.find("source").get("path").endswith("/0123456789ab/console.log")
    assert serial.find("source").get("append") == "off"


def test_lifecycle_and_idle_features():
    root = parse(make_spec())
    assert root.findtext("on_crash") == "destroy"
    assert root.findtext("on_reboot") == "destroy"
    assert root.findtext("on_poweroff") == "destroy"
    features = root.find("features")
    assert features.find("acpi") is not None
    assert features.find("apic") is not None


def test_tcg_gets_a_small_translation_cache():
    root = parse(make_spec(accel="tcg", tb_cache_mib=48))
    tb_cache = root.find("features/tcg/tb-cache")
    assert (tb_cache.text, tb_cache.get("unit")) == ("48", "MiB")
    assert root.find("cpu") is None


def test_kvm_has_no_tcg_settings():
    root = parse(make_spec(accel="kvm"))
    assert root.get("type") == "kvm"
    assert root.find("features/tcg") is None
    assert "tb-cache" not in domain.domain_xml(make_spec(accel="kvm"))
    assert root.find("cpu").get("mode") == "host-passthrough"


def test_cpu_quota_is_a_global_cgroup_quota():
    cputune = parse(make_spec(cpu_quota=1.5)).find("cputune")
    assert cputune.findtext("global_period") == "100000"
    assert cputune.findtext("global_quota") == "150000"


def test_bad_accel_is_refused():
    with pytest.raises(ValueError):
        domain.domain_xml(make_spec(accel="xen"))


def test_metadata_is_escaped():
    xml = domain.domain_xml(make_spec(metadata={"session": 'a"<b>&'}))
    assert domain.read_metadata(xml)["session"] == 'a"<b>&'


# --- names and paths -------------------------------------------------------------------------


def settings(**kw) -> Settings:
    return Settings(**{"instance": "abcd1234", "host_name": "Worker_1.example.com", **kw})


def test_names_carry_instance_and_host_and_fixed_length_key():
    s = settings()
    key = domain.vm_key("a VM id that is rather long " * 4)
    assert len(key) == domain.KEY_LEN
    name = domain.domain_name(s, key)
    assert name.startswith("shoal-abcd1234-worker-1-example-com-")
    assert domain.key_of(s, name) == key
    template = templates.template_key({"x": 1})
    assert len(domain.domain_name(s, template)) == len(name)  # the save-image rewrite needs it
    assert domain.key_of(s, domain.domain_name(s, template)) == template
    assert domain.is_template_key(template) and not domain.is_template_key(key)


def test_other_hosts_and_instances_are_not_ours():
    mine, other_host = settings(host_name="web"), settings(host_name="web-1")
    key = domain.vm_key("s")
    assert domain.key_of(mine, domain.domain_name(other_host, key)) is None
    assert domain.key_of(other_host, domain.domain_name(mine, key)) is None
    assert domain.key_of(mine, domain.domain_name(settings(instance="other"), key)) is None
    assert domain.key_of(mine, "some-other-vm") is None


def test_vm_paths_are_one_directory_per_vm(tmp_path):
    s = settings(vm_dir=str(tmp_path))
    paths = domain.vm_paths(s, "0123456789ab")
    assert paths.dir == tmp_path / "abcd1234" / "vms" / "0123456789ab"
    assert {p.parent for p in (paths.data_disk, paths.socket, paths.console_log)} == {paths.dir}
    with pytest.raises(ValueError, match="shorter"):
        domain.vm_paths(settings(vm_dir="/" + "x" * 100), "0123456789ab")


def test_make_dirs_leaves_every_level_traversable(tmp_path):
    target = tmp_path / "vm" / "inst" / "vms" / "k"
    domain.make_dirs(target, tmp_path / "vm")
    for directory in (tmp_path / "vm", target.parent.parent, target.parent, target):
        assert directory.stat().st_mode & 0o711 == 0o711


# --- clones ----------------------------------------------------------------------------------

SAVED = """<domain type='qemu'>
  <name>shoal-abcd1234-host-t0123456789a</name>
  <uuid>11111111-2222-3333-4444-555555555555</uuid>
  <metadata xmlns:shoal="urn:shoal:vm:1"><shoal:vm template="t0123456789a"/></metadata>
  <memory unit='KiB'>524288</memory>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/>
      <source file='/img/rootfs.ext4'/><backingStore/><target dev='vda' bus='virtio'/><readonly/>
    </disk>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='/t/.building-t0123456789a/data.qcow2'/>
      <backingStore type='file'><format type='raw'/><source file='/base.ext4'/></backingStore>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/>
      <source file='/t/.building-t0123456789a/transfer.img'/><backingStore/>
      <target dev='vdc' bus='virtio'/><serial>shoal-transfer</serial><readonly/>
    </disk>
    <serial type='file'><source path='/t/.building-t0123456789a/console.log' append='off'/>
      <target type='isa-serial' port='0'/></serial>
    <console type='file'><source path='/t/.building-t0123456789a/console.log' append='off'/>
      <target type='serial' port='0'/></console>
    <channel type='unix'><source mode='bind' path='/t/.building-t0123456789a/agent.sock'/>
      <target type='virtio' name='org.shoal.agent.0'/></channel>
  </devices>
  <seclabel type='static' model='dac' relabel='no'><label>+900007:+900007</label></seclabel>
</domain>"""


def test_retarget_gives_the_clone_its_own_identity_and_files():
    xml = domain.retarget_xml(
        SAVED,
        name="shoal-abcd1234-host-0123456789ab",
        uuid=UUID,
        data_disk=Path("/v/k/data.qcow2"),
        transfer_disk=Path("/v/k/transfer.img"),
        agent_socket=Path("/v/k/agent.sock"),
        console_log=Path("/v/k/console.log"),
        metadata={"session": "s-9", "restored": "1"},
        identity=VMIdentity(900003, 900003),
    )
    root = ET.fromstring(xml)
    assert root.findtext("name") == "shoal-abcd1234-host-0123456789ab"
    assert root.findtext("uuid") == UUID
    assert disk(root, "vdb").find("source").get("file") == "/v/k/data.qcow2"
    assert disk(root, "vdb").find("backingStore") is None
    assert disk(root, "vdc").find("source").get("file") == "/v/k/transfer.img"
    assert disk(root, "vdc").find("readonly") is not None
    assert disk(root, "vda").find("source").get("file") == "/img/rootfs.ext4"
    assert root.find("devices/channel/source").get("path") == "/v/k/agent.sock"
    assert root.find("devices/serial/source").get("path") == "/v/k/console.log"
    assert root.find("devices/console/source").get("path") == "/v/k/console.log"
    assert domain.read_metadata(xml) == {"session": "s-9", "restored": "1"}
    assert ".building" not in xml
    # Its own uid, never the template's: one DAC seclabel, relabel off.
    (seclabel,) = root.findall("seclabel")
    assert seclabel.attrib == {"type": "static", "model": "dac", "relabel": "no"}
    assert seclabel.findtext("label") == "+900003:+900003"
    assert identity_of(xml) == VMIdentity(900003, 900003)


def save_image(path: Path, xml: str, cookie: bytes = b"<cookie/>\n") -> bytes:
    body = xml.encode() + b"\0"
    data = body + cookie + b"\0" * 4096
    header = struct.pack("=16s19I", b"LibvirtQemudSave", 2, len(data), 1, 0, len(body), *([0] * 14))
    content = header + data + b"QEMU-MIGRATION-STREAM" * 100
    path.write_bytes(content)
    return content


def test_save_image_rewrite_is_in_place_and_same_length(tmp_path):
    image = tmp_path / "state.save"
    original = save_image(image, SAVED)
    templates.rewrite_save_image(
        image,
        {
            "shoal-abcd1234-host-t0123456789a": "shoal-abcd1234-host-0123456789ab",
            "11111111-2222-3333-4444-555555555555": UUID,
        },
    )
    rewritten = image.read_bytes()
    assert len(rewritten) == len(original)
    xml = templates.saved_xml(image)
    assert "<name>shoal-abcd1234-host-0123456789ab</name>" in xml
    assert f"<uuid>{UUID}</uuid>" in xml
    tail = original.index(b"<cookie/>")
    assert rewritten[tail:] == original[tail:]  # the cookie and the migration stream are intact


def test_save_image_rewrite_refuses_what_would_shift_offsets(tmp_path):
    image = tmp_path / "state.save"
    save_image(image, SAVED)
    with pytest.raises(TemplateError, match="same-length"):
        templates.rewrite_save_image(image, {"shoal-abcd1234-host-t0123456789a": "short"})
    with pytest.raises(TemplateError, match="not in the save image"):
        templates.rewrite_save_image(image, {"absent-name": "absent-nam2"})
    (tmp_path / "junk").write_bytes(b"x" * 200)
    with pytest.raises(TemplateError, match="not a libvirt"):
        templates.rewrite_save_image(tmp_path / "junk", {"a": "b"})


def test_template_keys_follow_their_inputs():
    a = templates.template_key({"recipe_hash": "r1", "shape": {"vcpus": 1}})
    b = templates.template_key({"recipe_hash": "r2", "shape": {"vcpus": 1}})
    c = templates.template_key({"recipe_hash": "r1", "shape": {"vcpus": 2}})
    assert len({a, b, c}) == 3
    assert a == templates.template_key({"shape": {"vcpus": 1}, "recipe_hash": "r1"})


# --- accelerator and cgroups -----------------------------------------------------------------


def test_tcg_without_hardware_flags(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor : 0\nflags : fpu sse2 hypervisor\n")
    choice = accel.detect("auto", cpuinfo_path=str(cpuinfo), kvm_path=str(tmp_path / "kvm"))
    assert choice.kind == "tcg" and "vmx/svm" in choice.reason


def test_tcg_when_dev_kvm_is_unusable(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags : fpu vmx sse2\n")
    choice = accel.detect("auto", cpuinfo_path=str(cpuinfo), kvm_path=str(tmp_path / "none"))
    assert choice.kind == "tcg" and "cannot be opened" in choice.reason


def test_forced_choices_and_bad_setting():
    assert accel.detect("tcg").kind == "tcg"
    assert accel.detect("kvm").kind == "kvm"
    with pytest.raises(ValueError):
        accel.detect("hvf")


def test_libvirt_capabilities_parsing():
    caps = (
        "<capabilities><guest><arch name='x86_64'><domain type='qemu'/><domain type='kvm'/>"
        "</arch></guest></capabilities>"
    )
    assert accel.libvirt_offers_kvm(caps)
    assert not accel.libvirt_offers_kvm(caps.replace("<domain type='kvm'/>", ""))


def test_cgroup_probe(tmp_path):
    cpu = tmp_path / "cpu"
    cpu.mkdir()
    (cpu / "cpu.cfs_quota_us").write_text("-1\n")
    mounts = tmp_path / "mounts"
    mounts.write_text(f"cgroup {cpu} cgroup rw,relatime,cpu 0 0\n")
    probe = cgroups.probe_cpu_controller(str(mounts))
    assert probe.available and probe.version == "v1"
    mounts.write_text(f"cgroup {tmp_path} cgroup rw,memory 0 0\n")
    assert not cgroups.probe_cpu_controller(str(mounts)).available
    (tmp_path / "cgroup.controllers").write_text("memory pids cpu\n")
    mounts.write_text(f"cgroup2 {tmp_path} cgroup2 rw 0 0\n")
    assert cgroups.probe_cpu_controller(str(mounts)).version == "v2"
    mounts.write_text("")
    assert "no cgroup" in cgroups.probe_cpu_controller(str(mounts)).detail
