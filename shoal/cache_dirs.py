"""Directories in Shoal's cache that QEMU reads, and the lock under which one is filled.

QEMU runs under a uid of its own per VM (workers/vm_identity.py), so every directory from the
cache down to a disk or an image file must be traversable by other users. Both the data disk
(shoal/data_disk.py, made at run time by the worker) and the image builder (shoal/ops/) make
such directories, so this is in the core.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path

from shoal.images import ImageBuildError


def mkdir_public(path: Path, top: Path) -> None:
    """Make path (under top, ours) traversable by QEMU, which runs under per-VM uids.

    Directories from top down are made 0755; one above top that others cannot enter is an error
    (it is not ours to change).
    """
    path.mkdir(parents=True, exist_ok=True)
    for p in [path, *path.parents]:
        mode = p.stat().st_mode
        if mode & 0o005 == 0o005:
            continue
        if p == top or top in p.parents:
            p.chmod(mode | 0o755)
        else:
            raise ImageBuildError(
                "cache",
                f"{p} is not traversable by other users (mode {oct(mode & 0o777)}); QEMU "
                f"runs under per-VM uids and needs o+rx on every directory above {path}",
            )


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on path (made if missing) for the `with` block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
