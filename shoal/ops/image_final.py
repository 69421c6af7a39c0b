"""The final layer of a guest image: the base root plus init, agent and user, packed as ext4.

A hard-linked copy of the base root (shoal/ops/image_base.py), the rootfs overlays from
vm-images/, user `sandbox`, the init and the agent, packed with `mkfs.ext4 -d`; next to it the
initramfs, and what the manifest says is inside. Keyed by the recipe hash. About a minute.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import math
import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path

from shoal import protocol
from shoal.images import (
    COMMON_SRC,
    DATA_MOUNT,
    DATA_UID,
    GUEST_AGENT_DIR,
    GUEST_INIT,
    INITRD_FILE,
    KERNEL_FILE,
    ROOTFS_FILE,
    SANDBOX_USER,
    ImageBuildError,
    Recipe,
    agent_files,
    tree_files,
)
from shoal.ops.image_fs import replace_file, safe_rmtree
from shoal.ops.image_harden import strip_privileges
from shoal.ops.image_steps import Build


def _copy_overlay(src: Path, rootfs: Path) -> None:
    """Copy vm-images/.../rootfs/ into the staged root: root-owned, modes from the repo."""
    if not src.is_dir():
        return
    for path in tree_files(src):
        rel = path.relative_to(src)
        mode = 0o755 if os.access(path, os.X_OK) else 0o644
        replace_file(rootfs / rel, path.read_bytes(), mode)


def _add_user(rootfs: Path) -> None:
    etc = rootfs / "etc"
    u, g = DATA_UID, DATA_UID
    entries = {
        "passwd": f"{SANDBOX_USER}:x:{u}:{g}:Shoal sandbox:/tmp:/bin/bash",
        "group": f"{SANDBOX_USER}:x:{g}:",
        "shadow": f"{SANDBOX_USER}:!:19000:0:99999:7:::",
        "gshadow": f"{SANDBOX_USER}:!::",
    }
    for fname, line in entries.items():
        path = etc / fname
        old = path.read_text() if path.exists() else ""
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
        kept = [x for x in old.splitlines() if x.split(":", 1)[0] != SANDBOX_USER]
        replace_file(path, ("\n".join(kept + [line]) + "\n").encode(), mode)
        if fname in ("shadow", "gshadow"):
            os.chown(path, 0, 42)  # group shadow, as Debian has it


def _install_agent(rootfs: Path, agent_src: Path) -> list[str]:
    files = agent_files(agent_src)
    if not any(p.name == "agent.py" for p in files):
        raise ImageBuildError("agent", f"no agent.py in {agent_src}: the image needs the agent")
    dest = rootfs / GUEST_AGENT_DIR.lstrip("/")
    for p in files:
        replace_file(dest / p.name, p.read_bytes())
    replace_file(dest / "shoal" / "__init__.py", b"")
    replace_file(dest / "shoal" / "protocol.py", Path(protocol.__file__).read_bytes())
    return [p.name for p in files] + ["shoal/__init__.py", "shoal/protocol.py"]


def _build_initramfs(b: Build, base: Path, out: Path, work: Path) -> None:
    stage = work / "initramfs"
    for d in ("bin", "dev", "proc", "sys", "newroot", "lib/modules"):
        (stage / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(base / "busybox", stage / "bin" / "busybox")
    (stage / "bin" / "busybox").chmod(0o755)
    (stage / "bin" / "sh").symlink_to("busybox")
    shutil.copy2(COMMON_SRC / "initramfs-init", stage / "init")
    (stage / "init").chmod(0o755)
    for p in (base / "kernel" / "modules").iterdir():
        shutil.copy2(p, stage / "lib" / "modules" / p.name)
    os.mknod(stage / "dev" / "console", 0o600 | 0o020000, os.makedev(5, 1))
    os.mknod(stage / "dev" / "null", 0o666 | 0o020000, os.makedev(1, 3))
    # Uncompressed: the kernel would spend longer unpacking it under TCG than QEMU loading it.
    listing = "\n".join(sorted(str(p.relative_to(stage)) for p in stage.rglob("*")))
    b.log(listing)
    with out.open("wb") as f:
        proc = subprocess.run(
            ["cpio", "--quiet", "-o", "-H", "newc", "--owner=0:0", "--reproducible"],
            cwd=stage,
            input=(listing + "\n").encode(),
            stdout=f,
            stderr=subprocess.PIPE,
        )
    if proc.returncode != 0:
        raise ImageBuildError("initramfs", "cpio failed", proc.stderr.decode(errors="replace"))
    shutil.rmtree(stage)


def _dpkg_packages(rootfs: Path) -> dict[str, str]:
    status = (rootfs / "var/lib/dpkg/status").read_text()
    pkgs = {}
    for stanza in status.split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in stanza.splitlines() if ": " in line and line[0] != " "
        )
        if fields.get("Status", "").endswith(" installed") and "Package" in fields:
            pkgs[fields["Package"]] = fields.get("Version", "")
    return dict(sorted(pkgs.items()))


def _python_info(rootfs: Path, debs: dict[str, str]) -> dict:
    exe = os.readlink(rootfs / "usr/bin/python3")  # "python3.11"
    minor = exe.removeprefix("python")
    deb_version = debs.get(f"{exe}-minimal") or debs.get(exe, "")
    version = re.sub(r"^\d+:", "", deb_version).split("-")[0].split("+")[0]
    paths = [
        str(rootfs / "usr/lib/python3/dist-packages"),
        str(rootfs / f"usr/lib/{exe}"),
        str(rootfs / f"usr/local/lib/{exe}/dist-packages"),
    ]
    packages = {}
    for dist in importlib.metadata.distributions(path=paths):
        name = dist.metadata["Name"]
        if name:
            packages[re.sub(r"[-_.]+", "-", name).lower()] = dist.version
    return {
        "version": version or minor,
        "executable": f"/usr/bin/{exe}",
        "packages": dict(sorted(packages.items())),
    }


def _content_size(root: Path) -> tuple[int, int]:
    """(bytes in 4 KiB blocks, inode count) of a tree, hard links counted once."""
    blocks = 0
    inodes = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        blocks += 1
        inodes += 1
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            st = os.lstat(os.path.join(dirpath, name))
            if st.st_nlink > 1:
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
            inodes += 1
            if not os.path.islink(os.path.join(dirpath, name)) or st.st_size > 59:
                blocks += math.ceil(st.st_size / 4096)
    return blocks * 4096, inodes


def _make_rootfs(b: Build, recipe: Recipe, rootfs: Path, out: Path, rhash: str) -> dict:
    content, inodes = _content_size(rootfs)
    n_inodes = int(inodes * 1.1) + 4096
    # ext4 metadata: inode tables (256 B each), bitmaps, group descriptors, extent blocks: ~5%.
    size = int(content * 1.05) + n_inodes * 256 + recipe.headroom_mib * 2**20
    fs_uuid = str(uuid.UUID(hashlib.sha256(rhash.encode()).hexdigest()[:32]))
    for attempt in range(3):
        size_mib = math.ceil(size / 2**20)
        if out.exists():
            out.unlink()
        argv = [
            "mkfs.ext4", "-q", "-F", "-t", "ext4", "-L", "shoal-root", "-U", fs_uuid,
            "-m", "0", "-N", str(n_inodes), "-O", "^has_journal",
            "-E", "root_owner=0:0,lazy_itable_init=0",
            "-d", str(rootfs), str(out), f"{size_mib}M",
        ]  # fmt: skip
        try:
            b.run("mkfs.ext4", argv)
            break
        except ImageBuildError as exc:
            if attempt == 2 or "space" not in exc.output_tail.lower():
                raise
            b.say(f"mkfs.ext4: {size_mib} MiB was too small, retrying 25% larger")
            size = int(size * 1.25)
    return {"content_bytes": content, "inodes": n_inodes, "size_mib": size_mib}


def build_final(
    recipe: Recipe, rhash: str, b: Build, work: Path, base: Path, agent_src: Path
) -> dict:
    rootfs = work / "rootfs"
    with b.step("stage root"):
        # Hard links: a second copy of the base root costs seconds and no space. Files that
        # change are replaced (unlinked, rewritten), never written through the link.
        b.run("stage root", ["cp", "-al", str(base / "rootfs"), str(rootfs)])
        _copy_overlay(COMMON_SRC / "rootfs", rootfs)
        _copy_overlay(recipe.dir / "rootfs", rootfs)
        _add_user(rootfs)
        data = rootfs / DATA_MOUNT.lstrip("/")
        data.mkdir(parents=True, exist_ok=True)
        os.chown(data, DATA_UID, DATA_UID)
        data.chmod(0o755)
    with b.step("harden"):
        stripped = strip_privileges(rootfs)
        b.log("setuid/setgid bits and file capabilities removed from: " + " ".join(stripped))
    with b.step("agent"):
        replace_file(
            rootfs / GUEST_INIT.lstrip("/"), (COMMON_SRC / "guest-init").read_bytes(), 0o755
        )
        installed = _install_agent(rootfs, agent_src)
        # Byte-compile with the guest's own interpreter (the root is read-only at runtime).
        b.run(
            "agent",
            ["chroot", str(rootfs), "/usr/bin/python3", "-m", "compileall", "-q", GUEST_AGENT_DIR],
        )
    with b.step("initramfs"):
        _build_initramfs(b, base, work / INITRD_FILE, work)
        shutil.copy2(base / "kernel" / KERNEL_FILE, work / KERNEL_FILE)
    with b.step("manifest"):
        debs = _dpkg_packages(rootfs)
        python = _python_info(rootfs, debs)
    with b.step("mkfs.ext4"):
        fs = _make_rootfs(b, recipe, rootfs, work / ROOTFS_FILE, rhash)
    with b.step("cleanup"):
        safe_rmtree(rootfs)
    sizes = {
        "rootfs_bytes": (work / ROOTFS_FILE).stat().st_size,
        "rootfs_allocated_bytes": (work / ROOTFS_FILE).stat().st_blocks * 512,
        "rootfs_content_bytes": fs["content_bytes"],
        "rootfs_inodes": fs["inodes"],
        "kernel_bytes": (work / KERNEL_FILE).stat().st_size,
        "initrd_bytes": (work / INITRD_FILE).stat().st_size,
    }
    return {
        "agent_files": installed,
        "privileges_stripped": stripped,
        "debs": debs,
        "python": python,
        "sizes": sizes,
    }
