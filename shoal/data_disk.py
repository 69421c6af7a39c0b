"""The data disk base: the formatted, empty ext4 file under every session's data disk.

Each session's disk is a qcow2 overlay on it, made by the VM driver (workers/vm.py) when it boots
a VM, so this is run-time code in the core, not part of the image builder (shoal/ops/). The file
is made once per size, with mkfs.ext4 and debugfs, and cached.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

from shoal.cache_dirs import exclusive_lock, mkdir_public
from shoal.images import DATA_UID, ImageBuildError
from shoal.settings import Settings

DATA_FORMAT = 1  # part of the file's name: bump it when the file made changes


def data_disk_base(settings: Settings, size_mib: int) -> Path:
    """A sparse, formatted ext4 file of size_mib, root directory owned by 1000:1000, cached.

    Per-session disks are qcow2 overlays on it: `qemu-img create -f qcow2 -b BASE -F raw X`.
    """
    if size_mib < 16:
        raise ValueError(f"data disk of {size_mib} MiB is too small (16 MiB at least)")
    parent = Path(settings.cache) / "data"
    final = parent / f"data-{size_mib}m-v{DATA_FORMAT}.ext4"
    if final.is_file():
        return final
    mkdir_public(parent, Path(settings.cache))
    with exclusive_lock(parent / ".lock"):
        if final.is_file():
            return final
        tmp = parent / f".{final.name}.partial-{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        try:
            # Inode tables and journal written now, once: with lazy init the guest kernel would
            # zero them in the background after every boot, writing into each session's overlay.
            ext = f"root_owner={DATA_UID}:{DATA_UID},lazy_itable_init=0,lazy_journal_init=0"
            subprocess.run(
                [
                    "mkfs.ext4", "-q", "-F", "-t", "ext4", "-L", "shoal-data", "-m", "0",
                    "-E", ext, str(tmp), f"{size_mib}M",
                ],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
            # An empty /mnt/data for the user: lost+found is recreated by e2fsck if ever needed.
            subprocess.run(
                ["debugfs", "-w", "-R", "rmdir lost+found", str(tmp)],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
            tmp.chmod(0o644)
            tmp.rename(final)
        except subprocess.CalledProcessError as exc:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise ImageBuildError(
                "data disk", f"{exc.cmd[0]} exited with {exc.returncode}", exc.stderr or ""
            ) from None
    return final
