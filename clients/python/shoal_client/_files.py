"""Upload sources and download targets, shared by both clients: files move in chunks, so
neither side holds a whole file in memory."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import BinaryIO, Union

CHUNK = 1 << 20

Source = Union[bytes, bytearray, memoryview, str, "os.PathLike[str]", BinaryIO]


def body(source: Source) -> tuple[bytes | Iterator[bytes], bool]:
    """(what httpx sends, whether sending it again sends the same bytes). bytes go as they are;
    a path (str or PathLike) is read in chunks, opened afresh on each attempt; a file object is
    read from where it stands (replayable when it can seek back)."""
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source), True
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"no local file {path}")
        return _read_path(path), True
    start = source.tell() if source.seekable() else None
    return _read_file(source, start), start is not None


def _read_path(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


def _read_file(f: BinaryIO, start: int | None) -> Iterator[bytes]:
    if start is not None:
        f.seek(start)
    while chunk := f.read(CHUNK):
        yield chunk


def fresh(source: Source) -> bytes | Iterator[bytes]:
    """The body for one more attempt."""
    return body(source)[0]


def length_header(source: Source | None) -> dict[str, str]:
    """Content-Length of a local file, so the body streams without chunked encoding and the
    server can refuse one over its cap before any byte moves."""
    if isinstance(source, str | os.PathLike):
        return {"Content-Length": str(Path(source).stat().st_size)}
    return {}


class IncompleteDownload(OSError):
    """The connection closed short of Content-Length (the session's VM lost midway, say)."""


def expect_length(received: int, declared: str | None, what: str) -> None:
    if declared is not None and declared.isdigit() and received != int(declared):
        raise IncompleteDownload(f"{what}: received {received} of {declared} bytes")


async def aiter_body(source: Source) -> AsyncIterator[bytes]:
    """The same body for the async client: file reads run in a thread, one chunk at a time."""
    content = fresh(source)
    if isinstance(content, bytes):
        yield content
        return
    while True:
        chunk = await asyncio.to_thread(next, content, b"")
        if not chunk:
            return
        yield chunk
