"""File operations confined to the data directory, for the guest agent.

Every path the host names is resolved here, never by the kernel: a path is a list of names under
the data directory, walked one component at a time with ``openat(..., O_NOFOLLOW)`` from a
descriptor of the data directory, so no ``..``, absolute path or symbolic link can lead outside it,
and a symlink swapped in by user code between a check and a use cannot either (there is no check
separate from the use). Symbolic links are never followed: a path that goes through one, or a
list of one, is refused with ``path_outside_data``; stat shows a link as a link and delete removes
the link itself.

Only regular files are read or written. get and put look at the final name with ``lstat`` first
and refuse a directory (``is_a_directory``) or a symbolic link, FIFO, socket or device
(``not_a_regular_file``) without opening it; get then opens with ``O_NOFOLLOW | O_NONBLOCK`` and
checks the descriptor with ``fstat``, so a link or FIFO swapped in after the check is refused too
and never blocks the agent (opening a FIFO for reading without ``O_NONBLOCK`` waits for a writer).

The agent runs as root; the operations here run with the effective uid/gid of the sandbox user
(``DataDir.as_user``), so files are created with the user's ownership and permissions are the
user's. Standard library only.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import stat
from collections.abc import Iterator
from typing import Any

from shoal import protocol

MAX_PATH_CHARS = 4096
MAX_LIST_ENTRIES = 100_000  # keeps a file_list answer well under MAX_JSON_FROM_GUEST
MAX_LIST_DEPTH = 128
UPLOAD_PREFIX = ".shoal-upload-"
DIRECT_ALIGN = 4096  # a write bypasses the page cache only in whole blocks at a block offset

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

_ERRNO_CODES = {
    errno.ENOENT: protocol.E_NOT_FOUND,
    errno.ENOTDIR: protocol.E_NOT_DIRECTORY,
    errno.EISDIR: protocol.E_IS_DIRECTORY,
    errno.ELOOP: protocol.E_PATH_OUTSIDE,
    errno.ENOTEMPTY: protocol.E_NOT_EMPTY,
    errno.EACCES: protocol.E_PERMISSION,
    errno.EPERM: protocol.E_PERMISSION,
    errno.EROFS: protocol.E_PERMISSION,
    errno.ENOSPC: protocol.E_NO_SPACE,
    errno.EDQUOT: protocol.E_NO_SPACE,
    errno.EFBIG: protocol.E_NO_SPACE,
    errno.ENAMETOOLONG: protocol.E_INVALID,
    errno.EINVAL: protocol.E_INVALID,
    errno.EEXIST: protocol.E_INVALID,
}


class FileOpError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def os_error(exc: OSError, path: str) -> FileOpError:
    """Map an OSError to the protocol's error code, naming the user's path, not ours."""
    code = _ERRNO_CODES.get(exc.errno or 0, protocol.E_INTERNAL)
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    if code == protocol.E_PATH_OUTSIDE:
        reason = "goes through a symbolic link"
    return FileOpError(code, f"{path or '/'}: {reason}")


def _type_of(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


def _kind(mode: int) -> str:
    """What a path that is not a regular file is, in words, for the refusal's message."""
    if stat.S_ISLNK(mode):
        return "is a symbolic link (links are never followed)"
    if stat.S_ISFIFO(mode):
        return "is a FIFO"
    if stat.S_ISSOCK(mode):
        return "is a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device"
    return "is not a regular file"


def check_regular(st: os.stat_result, path: str) -> None:
    """Refuse anything but a regular file: a directory, a link, a FIFO, a socket or a device."""
    if stat.S_ISREG(st.st_mode):
        return
    if stat.S_ISDIR(st.st_mode):
        raise FileOpError(protocol.E_IS_DIRECTORY, f"{path}: is a directory")
    raise FileOpError(
        protocol.E_NOT_REGULAR, f"{path}: {_kind(st.st_mode)}; only regular files are moved"
    )


def _lstat_existing(name: str, dir_fd: int) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def entry(relpath: str, name: str, st: os.stat_result) -> dict[str, Any]:
    return {
        "path": relpath,
        "name": name,
        "type": _type_of(st.st_mode),
        "size": st.st_size,
        "mtime": st.st_mtime,
    }


class Upload:
    """A file being received: written to a hidden temporary name, renamed into place at the end."""

    def __init__(self, data_dir: DataDir, path: str, parent_fd: int, name: str):
        self.data_dir = data_dir
        self.path = path
        self.parent_fd = parent_fd
        self.name = name
        self.tmp_name = UPLOAD_PREFIX + os.urandom(8).hex()
        self.size = 0
        with data_dir.as_user():
            self.fd = os.open(
                self.tmp_name,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o644,
                dir_fd=parent_fd,
            )

    def write(self, data: bytes | memoryview, direct: bool = False) -> None:
        """Append `data`. With `direct` (the bytes are in a page-aligned buffer: the transfer
        disk's), whole blocks at a block-aligned offset go to the disk without the guest's page
        cache: under TCG the guest's copy of them into its cache costs more CPU than all the
        rest of an upload."""
        view = memoryview(data)
        self._direct(direct and self.size % DIRECT_ALIGN == 0 and len(view) % DIRECT_ALIGN == 0)
        try:
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
                self.size += n
        except OSError as exc:
            self.abort()
            raise os_error(exc, self.path) from None

    def _direct(self, on: bool) -> None:
        """O_DIRECT on or off for the next write; left off where the file system refuses it."""
        flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
        if bool(flags & os.O_DIRECT) != on:
            with contextlib.suppress(OSError):
                fcntl.fcntl(self.fd, fcntl.F_SETFL, flags ^ os.O_DIRECT)

    def commit(self) -> dict[str, Any]:
        try:
            os.close(self.fd)
            self.fd = -1
            with self.data_dir.as_user():
                # Again at the end: user code may have put a link, FIFO or directory there
                # meanwhile. (rename replaces a link or FIFO itself and never follows or opens it.)
                st = _lstat_existing(self.name, self.parent_fd)
                if st is not None:
                    check_regular(st, self.path)
                os.rename(
                    self.tmp_name, self.name, src_dir_fd=self.parent_fd, dst_dir_fd=self.parent_fd
                )
                st = os.stat(self.name, dir_fd=self.parent_fd, follow_symlinks=False)
        except OSError as exc:
            self.abort()
            raise os_error(exc, self.path) from None
        except FileOpError:
            self.abort()
            raise
        os.close(self.parent_fd)
        self.parent_fd = -1
        return entry(self.data_dir.relpath(self.path), self.name, st)

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.parent_fd >= 0:
            with contextlib.suppress(OSError), self.data_dir.as_user():
                os.unlink(self.tmp_name, dir_fd=self.parent_fd)
            os.close(self.parent_fd)
            self.parent_fd = -1


class DataDir:
    """The data directory and the only ways the agent touches files in it."""

    def __init__(self, root: str, uid: int | None = None, gid: int | None = None):
        self.root = os.path.realpath(root)
        self.uid = uid
        self.gid = gid
        # Absolute paths are accepted under the real root and under the guest's public name.
        self.prefixes = sorted({self.root, protocol.DATA_DIR}, key=len, reverse=True)

    # --- identity ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def as_user(self) -> Iterator[None]:
        """Run a block with the sandbox user's effective ids (the agent is single-threaded)."""
        if self.uid is None:
            yield
            return
        os.setegid(self.gid)
        os.seteuid(self.uid)
        try:
            yield
        finally:
            os.seteuid(0)
            os.setegid(0)

    # --- paths ------------------------------------------------------------------------------
    def split(self, path: Any) -> list[str]:
        """The user's path as a list of names under the root; refuses anything that escapes."""
        if not isinstance(path, str):
            raise FileOpError(protocol.E_INVALID, "path must be a string")
        if "\0" in path or len(path) > MAX_PATH_CHARS:
            raise FileOpError(protocol.E_INVALID, "path has a NUL byte or is too long")
        rest = path
        if path.startswith("/"):
            for prefix in self.prefixes:
                if path == prefix or path.startswith(prefix.rstrip("/") + "/"):
                    rest = path[len(prefix) :]
                    break
            else:
                raise FileOpError(protocol.E_PATH_OUTSIDE, f"{path}: outside {protocol.DATA_DIR}")
        parts = [p for p in rest.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise FileOpError(protocol.E_PATH_OUTSIDE, f"{path}: '..' is not allowed")
        return parts

    def relpath(self, path: str) -> str:
        return "/".join(self.split(path))

    def _open_root(self) -> int:
        return os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def _walk(self, parts: list[str], path: str, create: bool = False) -> int:
        """Open the directory named by parts, component by component, never following a link."""
        fd = self._open_root()
        try:
            for name in parts:
                try:
                    nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(name, 0o755, dir_fd=fd)
                    nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                        if stat.S_ISLNK(st.st_mode):
                            raise FileOpError(
                                protocol.E_PATH_OUTSIDE, f"{path}: goes through a symbolic link"
                            ) from None
                    raise
                os.close(fd)
                fd = nfd
            return fd
        except BaseException:
            os.close(fd)
            raise

    @contextlib.contextmanager
    def _parent(self, path: Any, create: bool = False) -> Iterator[tuple[int, str, list[str]]]:
        """(descriptor of the parent directory, final name, parts) for a non-root path."""
        parts = self.split(path)
        if not parts:
            raise FileOpError(protocol.E_IS_DIRECTORY, "the data directory itself")
        fd = self._walk(parts[:-1], path, create=create)
        try:
            yield fd, parts[-1], parts
        finally:
            os.close(fd)

    # --- operations -------------------------------------------------------------------------
    def stat(self, path: Any) -> dict[str, Any]:
        parts = self.split(path)
        try:
            with self.as_user():
                if not parts:
                    return entry("", "", os.stat(self.root))
                with self._parent(path) as (pfd, name, parts):
                    st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
                    return entry("/".join(parts), name, st)
        except OSError as exc:
            raise os_error(exc, path) from None

    def list(self, path: Any, recursive: bool = False) -> dict[str, Any]:
        parts = self.split(path)
        entries: list[dict[str, Any]] = []
        truncated = False
        try:
            with self.as_user():
                fd = self._walk(parts, path)
                try:
                    prefix = "/".join(parts) + "/" if parts else ""
                    truncated = self._list_dir(fd, prefix, recursive, entries, 0)
                finally:
                    os.close(fd)
        except OSError as exc:
            raise os_error(exc, path) from None
        entries.sort(key=lambda e: e["path"])
        return {"path": "/".join(parts), "entries": entries, "truncated": truncated}

    def _list_dir(
        self, fd: int, prefix: str, recursive: bool, out: list[dict[str, Any]], depth: int
    ) -> bool:
        """Append the entries under fd to out; True when a limit cut the listing short."""
        with os.scandir(fd) as it:
            items = list(it)
        truncated = False
        for item in items:
            if len(out) >= MAX_LIST_ENTRIES:
                return True
            try:
                st = item.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed while we looked
            rel = prefix + item.name
            out.append(entry(rel, item.name, st))
            if recursive and stat.S_ISDIR(st.st_mode):
                if depth >= MAX_LIST_DEPTH:
                    truncated = True
                    continue
                try:
                    cfd = os.open(item.name, _DIR_FLAGS, dir_fd=fd)
                except OSError:
                    continue  # replaced by a link or removed meanwhile: not followed
                try:
                    truncated |= self._list_dir(cfd, rel + "/", True, out, depth + 1)
                finally:
                    os.close(cfd)
        return truncated

    def open_read(self, path: Any) -> tuple[int, dict[str, Any]]:
        """A descriptor for reading a regular file, and its stat entry.

        Anything else is refused by its lstat, unopened. The open that follows cannot block or
        follow a link swapped in since (O_NONBLOCK, O_NOFOLLOW), and fstat checks what it got."""
        try:
            with self.as_user(), self._parent(path) as (pfd, name, parts):
                check_regular(os.stat(name, dir_fd=pfd, follow_symlinks=False), path)
                fd = os.open(
                    name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=pfd
                )
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # a link swapped in after the check
                link = _kind(stat.S_IFLNK)
                raise FileOpError(protocol.E_NOT_REGULAR, f"{path}: {link}") from None
            raise os_error(exc, path) from None
        try:
            st = os.fstat(fd)
            check_regular(st, path)
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd, entry("/".join(parts), name, st)

    def open_write(self, path: Any) -> Upload:
        """Start receiving a file; parent directories are created as needed."""
        parts = self.split(path)
        if not parts:
            raise FileOpError(protocol.E_IS_DIRECTORY, "the data directory itself")
        try:
            with self.as_user():
                pfd = self._walk(parts[:-1], path, create=True)
                try:
                    name = parts[-1]
                    st = _lstat_existing(name, pfd)
                    if st is not None:
                        check_regular(st, path)  # never write over a link, FIFO or device
                except BaseException:
                    os.close(pfd)
                    raise
            try:
                return Upload(self, path, pfd, name)
            except BaseException:
                os.close(pfd)
                raise
        except OSError as exc:
            raise os_error(exc, path) from None

    def delete(self, path: Any, recursive: bool = False) -> dict[str, Any]:
        parts = self.split(path)
        if not parts:
            raise FileOpError(protocol.E_INVALID, "cannot delete the data directory itself")
        try:
            with self.as_user(), self._parent(path) as (pfd, name, parts):
                st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    if recursive:
                        shutil.rmtree(name, dir_fd=pfd)
                    else:
                        os.rmdir(name, dir_fd=pfd)
                else:
                    os.unlink(name, dir_fd=pfd)
        except OSError as exc:
            raise os_error(exc, path) from None
        return {"path": "/".join(parts), "type": _type_of(st.st_mode)}
