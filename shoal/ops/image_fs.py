"""File-system helpers of the image builder: scratch trees, their cleanup, files in a staged root.

Each layer is built in a scratch directory next to its destination and renamed into place when
complete. These remove what a dead or failed build left behind (first unmounting what debootstrap
mounted below it) and write files into a staged root without writing through its hard links into
the base layer.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from shoal.images import ImageBuildError


def mounts_under(path: Path) -> list[str]:
    """Mount points below path, the deepest first (the order to unmount them in)."""
    prefix = str(path.resolve()).rstrip("/") + "/"
    found = []
    with open("/proc/self/mounts") as f:
        for line in f:
            mnt = line.split()[1].encode().decode("unicode_escape")
            if mnt.startswith(prefix):
                found.append(mnt)
    return sorted(found, key=len, reverse=True)


def safe_rmtree(path: Path) -> None:
    """rmtree that first unmounts anything debootstrap left mounted below (its /proc, /dev)."""
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_dir() or path.is_symlink():
        path.unlink()
        return
    for mnt in mounts_under(path):
        subprocess.run(["umount", "-l", mnt], check=False, capture_output=True)
    left = mounts_under(path)
    if left:
        raise ImageBuildError("cleanup", f"refusing to delete {path}: still mounted: {left}")
    shutil.rmtree(path, ignore_errors=True)


def clean_partials(parent: Path) -> None:
    """Remove scratch directories of builds that died (their pid is gone)."""
    for p in parent.glob(".*.partial-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            safe_rmtree(p)


def replace_file(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write a file in the staged root, never through a hard link into the base layer."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        path.unlink()
    path.write_bytes(data)
    path.chmod(mode)
    os.chown(path, 0, 0)
