"""The file requests: stat, list and delete answered at once; file_get and file_put streamed.

files.py does the file operations themselves, confined to the data directory; this is the
protocol around them: a file_get sends its file as chunks while the host keeps up, a file_put
writes the chunks the host sends, and either is cancelled by an interrupt or a host that leaves
(supervisor.Agent). FileRequests is the part of supervisor.Agent that answers these requests.
Standard library only.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import files
from channel import BadRequest
from transfer_disk import DiskRangeError, TransferDisk

from shoal import protocol

if TYPE_CHECKING:
    from channel import Channel, Outbox

OUT_HIGH_WATER = 4 * protocol.FILE_CHUNK  # file_get reads ahead no further than this


class GetTransfer:
    """A file_get being streamed: the open file, read ahead no further than OUT_HIGH_WATER."""

    def __init__(self, request_id: int, fd: int, path: str):
        self.id = request_id
        self.fd = fd
        self.path = path
        self.sent = 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class PutTransfer:
    """A file_put being received: chunks go to a temporary file, renamed at the last one. With
    `via_disk`, each chunk names a byte range of the transfer disk instead of carrying bytes."""

    def __init__(self, request_id: int, upload: files.Upload | None, via_disk: bool = False):
        self.id = request_id
        self.upload = upload
        self.via_disk = via_disk
        self.error: files.FileOpError | None = None

    def close(self) -> None:
        if self.upload is not None:
            self.upload.abort()
            self.upload = None


class FileRequests:
    """Part of supervisor.Agent: the file requests, and the one transfer in progress. The state is
    the Agent's."""

    channel: Channel
    outbox: Outbox
    data_dir: files.DataDir
    transfer: GetTransfer | PutTransfer | None
    transfer_disk: TransferDisk | None

    def op_file_stat(self, rid: int, message: dict) -> None:
        self.answer(rid, **self.data_dir.stat(message.get("path", "")))

    def op_file_list(self, rid: int, message: dict) -> None:
        recursive = message.get("recursive", False)
        if not isinstance(recursive, bool):
            raise BadRequest("recursive must be a boolean")
        self.answer(rid, **self.data_dir.list(message.get("path", ""), recursive))

    def op_file_delete(self, rid: int, message: dict) -> None:
        recursive = message.get("recursive", False)
        if not isinstance(recursive, bool):
            raise BadRequest("recursive must be a boolean")
        self.answer(rid, **self.data_dir.delete(message.get("path"), recursive))

    def op_file_get(self, rid: int, message: dict) -> None:
        fd, info = self.data_dir.open_read(message.get("path"))
        self.transfer = GetTransfer(rid, fd, info["path"])
        self.answer(rid, **info)
        self._pump()

    def _pump(self) -> None:
        """Read the next chunks of a file_get while the host keeps up."""
        t = self.transfer
        if not isinstance(t, GetTransfer):
            return
        while self.transfer is t and self.outbox.size < OUT_HIGH_WATER:
            if self.channel.fd is None:
                return
            try:
                data = os.read(t.fd, protocol.FILE_CHUNK)
            except OSError as exc:
                t.close()
                self.transfer = None
                err = files.os_error(exc, t.path)
                self.error(t.id, err.code, err.message)
                return
            if not data:
                t.close()
                self.transfer = None
                self.send(
                    {"id": t.id, "ok": True, "op": protocol.OP_CHUNK, "eof": True, "size": t.sent}
                )
                return
            t.sent += len(data)
            self.send({"id": t.id, "op": protocol.OP_CHUNK}, data)

    def op_file_put(self, rid: int, message: dict) -> None:
        via_disk = message.get("via_disk", False)
        if not isinstance(via_disk, bool):
            raise BadRequest("via_disk must be a boolean")
        if via_disk and self.transfer_disk is None:
            raise BadRequest("this guest has no transfer disk")
        upload = self.data_dir.open_write(message.get("path"))
        self.transfer = PutTransfer(rid, upload, via_disk)
        self.answer(rid, ready=True)

    def _chunk(self, rid: int, message: dict, blob: bytes) -> None:
        t = self.transfer
        if not isinstance(t, PutTransfer) or t.id != rid:
            self.error(rid, protocol.E_INVALID, "chunk for no file_put in progress")
            return
        disk_range = message.get("disk")
        eof = message.get("eof") is True
        if t.via_disk:  # a range of the disk, or nothing with the eof
            wrong = bool(blob) or (disk_range is None and not eof)
        else:
            wrong = disk_range is not None
        if wrong:
            self._fail_put(t, files.FileOpError(protocol.E_INVALID, "chunk of the wrong kind"))
        elif t.upload is not None and t.error is None and not (t.via_disk and disk_range is None):
            try:
                if t.via_disk:
                    t.upload.write(self._disk_bytes(disk_range), direct=True)
                else:
                    t.upload.write(blob)
                if t.via_disk:  # the host may write this range of the disk again
                    self.send({"id": rid, "ok": True, "op": protocol.OP_CHUNK, "copied": True})
            except files.FileOpError as exc:
                self._fail_put(t, exc)
        if not eof:
            return
        self.transfer = None
        if t.error is not None:
            return  # already answered
        try:
            info = t.upload.commit()
        except files.FileOpError as exc:
            self.error(rid, exc.code, exc.message)
            return
        finally:
            t.upload = None
        self.answer(rid, **info)

    def _disk_bytes(self, disk_range: object) -> memoryview:
        """The bytes a disk chunk names: [offset, length] of the transfer disk."""
        if not (isinstance(disk_range, list) and len(disk_range) == 2):
            raise files.FileOpError(protocol.E_INVALID, "disk must be [offset, length]")
        try:
            return self.transfer_disk.read(*disk_range)
        except DiskRangeError as exc:
            raise files.FileOpError(protocol.E_INVALID, str(exc)) from None
        except OSError as exc:
            message = f"reading the transfer disk: {exc}"
            raise files.FileOpError(protocol.E_INTERNAL, message) from None

    def _fail_put(self, t: PutTransfer, exc: files.FileOpError) -> None:
        """Answer the upload's first error (the host may stop early) and drop its temporary
        file (if write() has not already)."""
        if t.error is not None:
            return
        t.error = exc
        t.close()
        self.error(t.id, exc.code, exc.message)
