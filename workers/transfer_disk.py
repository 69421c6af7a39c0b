"""The host's side of a VM's transfer disk: where an upload's bytes are written for the guest.

Why a disk: the agent's virtio-serial port takes host-to-guest bytes 4 KiB per buffer, each
buffer an exit into QEMU's device model, which under TCG caps uploads near 20 MiB/s; one
virtio-blk read moves megabytes. So each VM has a third disk (`vdc`, serial
protocol.TRANSFER_DISK_SERIAL): a raw file of protocol.TRANSFER_DISK_BYTES, read-only to the
guest. An upload is written into it as a ring of TRANSFER_SLOTS segments; each written segment is
named to the agent in a file_put chunk, and a slot is written again only after the agent said it
copied what the slot held (workers/agent_client.py, `put_file_via_disk`).

What a hostile guest can do with it: read its own session's uploads, nothing else. The file is
root's, readable by the VM's group alone (0640; QEMU opens it read-only), so the guest can never
write a byte the host later reads, and the host never reads it back. It is emptied after every
upload, so an idle VM holds no byte of it on the host's disk.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from shoal import protocol
from workers.vm_identity import VMIdentity

FILE_NAME = "transfer.img"  # in the VM's directory (workers/domain.py VMPaths)
SIZE = protocol.TRANSFER_DISK_BYTES
SEGMENT = protocol.TRANSFER_SEGMENT
SLOTS = protocol.TRANSFER_SLOTS
FILE_MODE = 0o640


def create(path: Path, identity: VMIdentity) -> None:
    """A new, empty (sparse) transfer disk at `path` that the VM `identity` may only read."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0)
    try:
        os.ftruncate(fd, SIZE)
        os.fchown(fd, 0, identity.gid)
        os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)


def empty(path: Path) -> None:
    """Give the disk's blocks back to the host's file system (it reads as zeros): after an
    upload, and when a restarted worker attaches to a VM whose upload it may have cut short."""
    with contextlib.suppress(FileNotFoundError):
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            _empty(fd)
        finally:
            os.close(fd)


def _empty(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.ftruncate(fd, SIZE)


class Writer:
    """One upload's writes into the disk. Use as a context manager: on exit the disk is emptied,
    whatever happened. Only one upload of a VM runs at a time (a session's file operations run
    one by one, workers/session_queue.py), so no other upload's bytes are emptied."""

    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        with contextlib.suppress(OSError):
            _empty(self.fd)
        os.close(self.fd)

    def segments(self, chunks: Iterable[bytes]) -> Iterator[tuple[int, int]]:
        """Write `chunks` round the ring; yield each segment's (offset, length) once written.

        The ring is the caller's to respect: after a segment is yielded, the generator writes
        into the next slot when resumed, so the caller resumes it only once that slot's last
        segment was copied by the guest (at most SLOTS - 1 segments awaiting the guest)."""
        slot = filled = 0
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                n = min(len(view), SEGMENT - filled)
                self._write(view[:n], slot * SEGMENT + filled)
                view = view[n:]
                filled += n
                if filled == SEGMENT:
                    yield slot * SEGMENT, SEGMENT
                    slot, filled = (slot + 1) % SLOTS, 0
        if filled:
            yield slot * SEGMENT, filled

    def _write(self, data: memoryview, offset: int) -> None:
        while data:
            n = os.pwrite(self.fd, data, offset)
            data, offset = data[n:], offset + n
