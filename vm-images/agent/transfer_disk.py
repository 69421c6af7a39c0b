"""The guest's side of the transfer disk: upload bytes read from a block device the host fills.

The host writes an upload's bytes into a read-only virtio-blk disk (serial
protocol.TRANSFER_DISK_SERIAL) and names each written byte range in a file_put chunk; the agent
copies that range into the file being uploaded. One virtio-blk read moves megabytes; the agent's
virtio-serial port takes host-to-guest bytes 4 KiB per buffer, each an exit into QEMU.

Reads bypass the guest's page cache (O_DIRECT): the host rewrites the same blocks for every
upload, so a cached block would be stale. Only root may open the device: user code never sees
another upload's bytes through it (they are its own session's anyway). Standard library only.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import stat

from shoal import protocol

log = logging.getLogger("shoal.agent")
SYS_BLOCK = "/sys/block"
READ_ALIGN = 4096  # the last read of a range is rounded up to it: any disk's logical block


class DiskRangeError(ValueError):
    """A disk chunk named a byte range the transfer disk cannot give."""


def find(sys_block: str = SYS_BLOCK) -> str | None:
    """The device node of the disk whose serial is the transfer disk's, or None."""
    try:
        names = sorted(os.listdir(sys_block))
    except OSError:
        return None
    for name in names:
        try:
            with open(os.path.join(sys_block, name, "serial"), errors="replace") as f:
                serial = f.read(64).strip()
        except OSError:
            continue
        if serial == protocol.TRANSFER_DISK_SERIAL:
            return os.path.join("/dev", name)
    return None


def _open_uncached(path: str) -> int:
    """O_DIRECT. A regular file on a file system without it (tmpfs, in the agent's tests on the
    host, whose page cache the writer shares) is opened plainly; a device never is: its cached
    blocks would be stale."""
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
    except OSError as exc:
        if exc.errno != errno.EINVAL or not stat.S_ISREG(os.stat(path).st_mode):
            raise
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


class TransferDisk:
    """The open transfer disk and one page-aligned buffer of a segment (O_DIRECT needs it)."""

    def __init__(self, path: str):
        self.path = path
        self.fd = _open_uncached(path)
        self.size = os.lseek(self.fd, 0, os.SEEK_END)
        self.buffer = mmap.mmap(-1, protocol.TRANSFER_SEGMENT)

    def read(self, offset: object, length: object) -> memoryview:
        """The bytes of [offset, offset + length), valid until the next read."""
        block = protocol.TRANSFER_BLOCK
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (offset, length)):
            raise DiskRangeError("disk range must be two integers")
        if offset < 0 or offset % block or not 0 < length <= protocol.TRANSFER_SEGMENT:
            raise DiskRangeError(f"disk range ({offset}, {length}) is not a valid segment")
        if offset + length > self.size:
            raise DiskRangeError(f"disk range ({offset}, {length}) ends past the disk")
        want = min(-(-length // READ_ALIGN) * READ_ALIGN, self.size - offset)
        view = memoryview(self.buffer)
        got = 0
        while got < want:
            n = os.preadv(self.fd, [view[got:want]], offset + got)
            if n <= 0:
                break
            got += n
        if got < length:
            raise OSError(errno.EIO, f"short read from the transfer disk ({got} of {length})")
        return view[:length]


def open_if_any(path: str | None) -> TransferDisk | None:
    """The transfer disk at `path`, or None when there is none or it cannot be opened (logged):
    uploads then come over the agent's channel, slower but whole."""
    if path is None:
        return None
    try:
        return TransferDisk(path)
    except OSError as exc:
        log.warning("transfer disk %s unusable, uploads use the channel: %s", path, exc)
        return None
