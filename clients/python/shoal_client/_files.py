"""Upload bodies and download targets, shared by both clients: files move in chunks, so
neither side holds a whole file in memory."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import BinaryIO, Union

CHUNK = 1 << 20

Source = Union[bytes, bytearray, memoryview, str, "os.PathLike[str]", BinaryIO]


class Body:
    """One upload's body, made once per request and sent again on each attempt: bytes as they
    are; a local path (str or PathLike) read in chunks, opened afresh each time, with its
    Content-Length; a binary file object read from where it stood when the upload began (sent
    again only when it can seek back there)."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.path: Path | None = None
        self.start: int | None = None
        if isinstance(source, bytes | bytearray | memoryview):
            self.data: bytes | None = bytes(source)
            return
        self.data = None
        if isinstance(source, str | os.PathLike):
            self.path = Path(source)
            if not self.path.is_file():
                raise FileNotFoundError(f"no local file {self.path}")
        elif source.seekable():
            self.start = source.tell()

    @property
    def replayable(self) -> bool:
        return self.data is not None or self.path is not None or self.start is not None

    def headers(self) -> dict[str, str]:
        """Content-Length where it is known, so the body streams without chunked encoding and
        the server can refuse one over its cap before any byte moves."""
        if self.data is not None:
            return {}  # httpx sets it
        if self.path is not None:
            return {"Content-Length": str(self.path.stat().st_size)}
        return {}

    def chunks(self) -> bytes | Iterator[bytes]:
        if self.data is not None:
            return self.data
        return self._read()

    def _read(self) -> Iterator[bytes]:
        if self.path is not None:
            with self.path.open("rb") as f:
                while chunk := f.read(CHUNK):
                    yield chunk
            return
        f: BinaryIO = self.source  # type: ignore[assignment]
        if self.start is not None:
            f.seek(self.start)
        while chunk := f.read(CHUNK):
            yield chunk

    def achunks(self) -> bytes | AsyncIterator[bytes]:
        """The same for the async client: bytes as they are, file reads in a thread."""
        if self.data is not None:
            return self.data
        return self._aread()

    async def _aread(self) -> AsyncIterator[bytes]:
        reader = self._read()
        try:
            while chunk := await asyncio.to_thread(next, reader, b""):
                yield chunk
        finally:
            reader.close()


class IncompleteDownload(OSError):
    """The connection closed short of Content-Length (the session's VM lost midway, say)."""


def expect_length(received: int, declared: str | None, what: str) -> None:
    if declared is not None and declared.isdigit() and received != int(declared):
        raise IncompleteDownload(f"{what}: received {received} of {declared} bytes")


@contextlib.contextmanager
def replaced_atomically(dest: Path) -> Iterator[BinaryIO]:
    """A temporary file beside `dest` that becomes `dest` only when the block ends without an
    error: a failed download never leaves a partial file behind."""
    fd, partial = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(partial, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise
