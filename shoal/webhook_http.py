"""One webhook POST over HTTP/1.1, to an address fixed in advance and bounded as a whole.

The receiver is untrusted. A socket timeout alone bounds each read, so a receiver that sends one
byte a second would hold a delivery thread for as long as it likes; here the attempt has one
deadline, and before every connect, send and read the socket's timeout is set to the time left
until it (TLS included: a handshake or a read on a TLS socket is bounded by its timeout as a
whole). What is read is capped too: the status line and headers at MAX_HEAD bytes, the body at
MAX_BODY bytes, which are read only while the deadline allows and then dropped.

Only the status matters. It counts once the status line and headers are in; a body that is
still coming at the deadline is left unread. The connection goes to `address` (the one the
caller's SSRF check passed), never to a second DNS answer; TLS still checks the certificate
against the URL's host name.
"""

from __future__ import annotations

import http.client
import re
import socket
import ssl
import time
from collections.abc import Callable
from urllib.parse import quote

MAX_HEAD = 16 << 10  # the status line and headers
MAX_BODY = 4096  # read from the body, then dropped
SEND_CHUNK = 64 << 10
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_STATUS_LINE = re.compile(rb"HTTP/\d(?:\.\d)? (\d{3})(?:[ \t][^\r\n]*)?\r?\Z")
_SAFE_IN_TARGET = "!#$%&'()*+,/:;=?@[]~"  # kept as is; anything else not ASCII is %-encoded


class Deadline:
    """The end of one attempt; `left()` is the time that remains, or TimeoutError."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.end = time.monotonic() + timeout_s

    def left(self) -> float:
        remaining = self.end - time.monotonic()
        if remaining <= 0:
            raise self.expired()
        return remaining

    def expired(self) -> TimeoutError:
        return TimeoutError(
            f"no complete answer within the attempt's {self.timeout_s:g} s "
            "(SHOAL_WEBHOOK_TIMEOUT_S)"
        )


def post(
    scheme: str,
    host: str,
    port: int,
    address: str,
    target: str,
    headers: dict[str, str],
    body: bytes,
    deadline: Deadline,
) -> int:
    """POST `body` to `target` at `address`; the answer's HTTP status. Raises OSError (network
    trouble; TimeoutError at the deadline) or http.client.HTTPException (not an HTTP answer)."""
    request = _request_head(scheme, host, port, target, headers, len(body)) + body
    try:
        sock = socket.create_connection((address, port), timeout=deadline.left())
        try:
            if scheme == "https":
                sock.settimeout(deadline.left())
                context = ssl.create_default_context()
                sock = context.wrap_socket(sock, server_hostname=host)
            _send(sock, request, deadline.left)
            return _read_status(sock, deadline)
        finally:
            sock.close()
    except TimeoutError:
        raise deadline.expired() from None


def _host_header(scheme: str, host: str, port: int) -> str:
    name = f"[{host}]" if ":" in host else host
    if not name.isascii():
        name = name.encode("idna").decode("ascii")
    default = 443 if scheme == "https" else 80
    return name if port == default else f"{name}:{port}"


def _request_head(
    scheme: str, host: str, port: int, target: str, headers: dict[str, str], length: int
) -> bytes:
    lines = [
        f"POST {quote(target, safe=_SAFE_IN_TARGET)} HTTP/1.1",
        f"Host: {_host_header(scheme, host, port)}",
        f"Content-Length: {length}",
        "Connection: close",
        "Accept-Encoding: identity",
    ]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _send(sock: socket.socket, data: bytes, left: Callable[[], float]) -> None:
    """Send in chunks, each with the time left: a receiver that reads slowly cannot stretch it."""
    view = memoryview(data)
    while view:
        sock.settimeout(left())
        sent = sock.send(view[:SEND_CHUNK])
        view = view[sent:]


def _read_status(sock: socket.socket, deadline: Deadline) -> int:
    buffer = b""
    while True:
        end = _HEAD_END.search(buffer)
        if end is None:
            if len(buffer) > MAX_HEAD:
                raise http.client.HTTPException(
                    f"the answer's status line and headers are over {MAX_HEAD} bytes"
                )
            sock.settimeout(deadline.left())
            chunk = sock.recv(MAX_HEAD + 4 - len(buffer))
            if chunk:
                buffer += chunk
                continue
            if b"\n" not in buffer:
                raise http.client.RemoteDisconnected(
                    "Remote end closed connection without response"
                )
            head, rest = buffer, b""  # closed after the head, without the blank line
        else:
            head, rest = buffer[: end.start()], buffer[end.end() :]
        status, length = _parse_head(head)
        if 100 <= status < 200:  # an interim answer (100 Continue): the real one follows
            buffer = rest
            continue
        if status not in (204, 304):
            _drain(sock, rest, length, deadline)
        return status


def _parse_head(head: bytes) -> tuple[int, int | None]:
    """(status, Content-Length or None) of a status line and headers."""
    status_line, _, fields = head.partition(b"\n")
    match = _STATUS_LINE.match(status_line)
    if match is None:
        raise http.client.BadStatusLine(repr(status_line[:100]))
    length = None
    for line in fields.split(b"\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            length = int(value.strip())
    return int(match.group(1)), length


def _drain(sock: socket.socket, already: bytes, length: int | None, deadline: Deadline) -> None:
    """Read (and drop) up to MAX_BODY bytes of the body while the deadline allows."""
    wanted = min(MAX_BODY, MAX_BODY if length is None else length) - len(already)
    while wanted > 0:
        remaining = deadline.end - time.monotonic()
        if remaining <= 0:
            return
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(wanted)
        except OSError:
            return  # the status is in; a body that fails or lags changes nothing
        if not chunk:
            return
        wanted -= len(chunk)
