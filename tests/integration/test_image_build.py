"""Light checks of the guest image: artifacts, manifest, cache behaviour. No VM is booted here.

The image is built (or, normally, reused from the cache) through `image_build.build()`;
`./scripts/test` builds it first, so these tests do not pay for a debootstrap. Building needs root
(debootstrap, chroot, mknod) and the agent in vm-images/agent/.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pytest

from shoal import data_disk, images, protocol
from shoal.ops import image_base, image_build, image_steps
from shoal.settings import REPO_ROOT, load

LIBRARIES = [
    "numpy",
    "pandas",
    "scipy",
    "scikit-learn",
    "matplotlib",
    "pillow",
    "sympy",
    "requests",
    "ipython",
]
DEBIAN_PACKAGES = [
    "python3",
    "python3-numpy",
    "python3-pandas",
    "python3-scipy",
    "python3-sklearn",
    "python3-matplotlib",
    "python3-pil",
    "python3-sympy",
    "python3-requests",
    "ipython3",
    "iproute2",
    "bash",
    "coreutils",
    "procps",
]


@pytest.fixture(scope="module")
def settings():
    return load()


@pytest.fixture(scope="module")
def built(settings) -> images.ImageArtifacts:
    if os.geteuid() != 0 or not shutil.which("debootstrap"):
        pytest.fail(
            "building a guest image needs root and debootstrap (./scripts/test installs it)"
        )
    directory = image_build.build(settings, "python")
    art = images.locate(settings, "python")
    assert art is not None and art.dir == directory
    return art


def _debugfs(fs: Path, request: str) -> str:
    out = subprocess.run(
        ["debugfs", "-R", request, str(fs)], check=True, capture_output=True, text=True
    )
    return out.stdout


# --- without a build -------------------------------------------------------------------------


def test_recipe_hash_is_stable_and_follows_the_agent(tmp_path):
    first = images.recipe_hash("python")
    assert first == images.recipe_hash("python")
    assert len(first) == 16 and int(first, 16) >= 0
    # A different agent is a different image.
    (tmp_path / "agent.py").write_text("print('another agent')\n")
    assert images.recipe_hash("python", _agent_src=tmp_path) != first


def test_recipe_lists_the_required_packages():
    recipe = images.load_recipe("python")
    assert set(DEBIAN_PACKAGES) <= set(recipe.include)
    assert "python3-ipykernel" not in recipe.include  # breaks debootstrap (python3-zmq)
    assert recipe.variant == "minbase"


def test_unknown_recipe_is_a_clear_error():
    with pytest.raises(image_build.ImageBuildError, match="no recipe 'nope'"):
        images.load_recipe("nope")


def test_mirror_setting_wins(settings):
    s = replace(settings, debian_mirror="http://mirror.example/debian/")
    assert image_base.debian_mirror(s) == "http://mirror.example/debian"


def test_kernel_cmdline_carries_the_contract(settings):
    line = images.kernel_cmdline(replace(settings, tmp_mib=300))
    for word in ("console=ttyS0", "root=/dev/vda", "ro", "shoal.tmp_mib=300"):
        assert word in line.split()


def test_module_order_follows_modules_dep(tmp_path):
    (tmp_path / "modules.builtin").write_text("kernel/fs/ext4/ext4.ko\n")
    (tmp_path / "modules.dep").write_text(
        "kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko\n"
        "kernel/drivers/virtio/virtio_ring.ko:\n"
        "kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko "
        "kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko\n"
        "kernel/drivers/virtio/virtio_pci_legacy_dev.ko:\n"
        "kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko "
        "kernel/drivers/virtio/virtio_ring.ko\n"
    )
    order, builtin = image_base.resolve_modules(tmp_path, ("virtio_pci", "virtio_blk", "ext4"))
    names = [Path(m).stem for m in order]
    assert builtin == ["ext4"]
    assert names.index("virtio_ring") < names.index("virtio") < names.index("virtio_pci")
    assert names.index("virtio_pci_legacy_dev") < names.index("virtio_pci")
    assert names[-1] == "virtio_blk" and len(names) == len(set(names))


def test_data_disk_base(settings):
    # Not under pytest's tmp_path: its parents are mode 0700, which QEMU (libvirt-qemu) could not
    # traverse, and data_disk_base() refuses such a cache directory.
    top = Path(tempfile.mkdtemp(prefix="shoal-test-cache-", dir="/var/tmp"))
    top.chmod(0o755)
    try:
        _check_data_disk(replace(settings, cache=str(top)))
    finally:
        shutil.rmtree(top)


def _check_data_disk(s):
    disk = data_disk.data_disk_base(s, 64)
    assert disk.stat().st_size == 64 << 20
    assert disk.stat().st_blocks * 512 < 32 << 20  # sparse
    assert data_disk.data_disk_base(s, 64) == disk  # cached
    root = _debugfs(disk, "stat /")
    assert "User:  1000" in root and "Group:  1000" in root
    assert "lost+found" not in _debugfs(disk, "ls /")


# --- with the built image --------------------------------------------------------------------


def test_artifacts_exist_and_qemu_can_read_them(built):
    for path in (built.kernel, built.initrd, built.rootfs, built.manifest):
        assert path.is_file() and path.stat().st_size > 0, path
        assert path.stat().st_mode & stat.S_IROTH, f"{path} is not world-readable"
    for d in [built.dir, *built.dir.parents]:
        assert d.stat().st_mode & stat.S_IXOTH, f"libvirt-qemu cannot traverse {d}"
    assert built.dir.name == f"python-{built.recipe_hash}"
    assert built.recipe_hash == images.recipe_hash("python")


def test_manifest_describes_the_image(built):
    m = json.loads(built.manifest.read_text())
    assert m["recipe_hash"] == built.recipe_hash
    assert m["python"]["version"].startswith("3.")
    for lib in LIBRARIES:
        assert m["python"]["packages"].get(lib), f"{lib} missing from the manifest"
    for pkg in DEBIAN_PACKAGES:
        assert m["debian_packages"].get(pkg), f"Debian package {pkg} missing"
    assert "python3-ipykernel" not in m["debian_packages"]
    assert m["kernel"]["release"] and m["kernel"]["package"].startswith("linux-image-")
    assert m["devices"]["channel"] == protocol.CHANNEL_NAME
    assert m["sizes"]["rootfs_bytes"] == built.rootfs.stat().st_size
    assert m["build_seconds"] > 0 and m["built_at"]
    assert {"/usr/bin/su", "/usr/bin/mount"} <= set(m["privileges_stripped"])


def test_second_build_returns_the_cached_image(settings, built):
    t = time.monotonic()
    assert image_build.build(settings, "python", progress=lambda _msg: None) == built.dir
    assert time.monotonic() - t < 5


def test_rootfs_holds_agent_init_and_user(built):
    fs = built.rootfs
    agent = _debugfs(fs, f"cat {images.GUEST_AGENT_DIR}/shoal/protocol.py")
    assert agent == (REPO_ROOT / "shoal" / "protocol.py").read_text()
    assert "agent.py" in _debugfs(fs, f"ls {images.GUEST_AGENT_DIR}")
    assert _debugfs(fs, f"cat {images.GUEST_INIT}").startswith("#!/bin/sh")
    assert "sandbox:x:1000:1000:" in _debugfs(fs, "cat /etc/passwd")
    data = _debugfs(fs, f"stat {images.DATA_MOUNT}")
    assert "User:  1000" in data and "Group:  1000" in data
    # Setuid stripped at build time (shoal/ops/image_harden.py): su is there, plain 0755.
    assert "Mode:  0755" in _debugfs(fs, "stat /usr/bin/su")


def test_initramfs_loads_the_virtio_modules_in_order(built):
    listing = subprocess.run(
        ["cpio", "-t", "--quiet"], input=built.initrd.read_bytes(), capture_output=True, check=True
    ).stdout.decode()
    for entry in ("init", "bin/busybox", "lib/modules/load-order", "dev/console"):
        assert entry in listing.split("\n"), entry
    order = json.loads(built.manifest.read_text())["kernel"]["modules"]
    for mod in ("virtio_ring", "virtio", "virtio_pci", "virtio_blk", "virtio_console"):
        assert mod in order
    assert order.index("virtio_ring") < order.index("virtio") < order.index("virtio_pci")


def test_failed_step_is_named_with_its_output(tmp_path):
    b = image_steps.Build("python", lambda _msg: None, tmp_path / "build.log")
    with pytest.raises(image_build.ImageBuildError) as err:
        b.run("probe", ["sh", "-c", "echo something went wrong; exit 3"])
    assert err.value.step == "probe"
    assert "status 3" in str(err.value) and "something went wrong" in str(err.value)


def test_failed_build_leaves_nothing_behind(settings, built):
    recipe = images.load_recipe("python")
    base = (
        Path(settings.cache)
        / "base"
        / f"python-{image_base.base_key(recipe, image_base.debian_mirror(settings))}"
    )
    assert base.is_dir(), "the `built` fixture leaves the base layer cached"
    top = Path(tempfile.mkdtemp(prefix="shoal-test-images-", dir="/var/tmp"))
    top.chmod(0o755)
    no_agent = top / "no-agent"
    no_agent.mkdir()
    (no_agent / "helper.py").write_text("x = 1\n")  # no agent.py
    try:
        with pytest.raises(image_build.ImageBuildError) as err:
            image_build.build(
                settings, "python", lambda _msg: None, _agent_src=no_agent, _dest=top / "out"
            )
        assert err.value.step == "agent"
        left = sorted(p.name for p in (top / "out").iterdir())
        assert all(name.startswith(".lock") or name.endswith(".failed.log") for name in left), left
    finally:
        shutil.rmtree(top)
