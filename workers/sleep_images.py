"""Where sleeping VMs' images live, and which template files they still need.

An image is `<instance_vm_dir>/sleeping/<key>.save` (workers/vm_sleep.py writes it). A sleeping
VM's data disk is a qcow2 overlay whose backing file is its template's data disk: that template
must outlive the sleep, even when a newer one replaces it (workers/templates.py asks here).
"""

from __future__ import annotations

import struct
from pathlib import Path

from shoal.settings import Settings
from workers import domain as dom

QCOW2_MAGIC = b"QFI\xfb"
_QCOW2_HEADER = struct.Struct(">4sIQI")  # magic, version, backing file offset, its length
MAX_BACKING_NAME = 4096


def sleep_dir(settings: Settings) -> Path:
    return settings.instance_vm_dir / "sleeping"


def image_path(settings: Settings, key: str) -> Path:
    return sleep_dir(settings) / f"{key}.save"


def total_bytes(settings: Settings) -> int:
    """The bytes of every sleep image of this instance on this host."""
    directory = sleep_dir(settings)
    total = 0
    for image in directory.glob("*.save") if directory.is_dir() else ():
        try:
            total += image.stat().st_size
        except FileNotFoundError:
            continue
    return total


def backing_file(overlay: Path) -> str | None:
    """The backing file a qcow2 image names (its header, as written by qemu-img), or None."""
    try:
        with open(overlay, "rb") as f:
            magic, _version, offset, length = _QCOW2_HEADER.unpack(f.read(_QCOW2_HEADER.size))
            if magic != QCOW2_MAGIC or not offset or not 0 < length <= MAX_BACKING_NAME:
                return None
            f.seek(offset)
            return f.read(length).decode("utf-8", "replace")
    except (OSError, struct.error):
        return None


def needed_backing_files(settings: Settings) -> set[str]:
    """The backing files of every sleeping VM's data disk on this instance, and of every fork
    base's frozen disk (workers/fork_base.py): the templates they need."""
    directory = sleep_dir(settings)
    disks = [dom.vm_paths(settings, image.stem).data_disk
             for image in (directory.glob("*.save") if directory.is_dir() else ())]  # fmt: skip
    disks += settings.instance_vm_dir.glob("forking-*/*/data.qcow2")
    return {name for name in map(backing_file, disks) if name}
