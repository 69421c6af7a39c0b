"""A loopback TCP proxy that fails on purpose, for the client SDK's retry tests: it can refuse
the first connections outright (closed before a byte) or pass a request on and drop its answer
(the server did the work, the client never hears of it)."""

from __future__ import annotations

import contextlib
import socket
import threading


class FlakyProxy:
    def __init__(self, upstream_port: int, drop_connections: int = 0, drop_answers: int = 0):
        self.upstream = ("127.0.0.1", upstream_port)
        self.drop_connections = drop_connections
        self.drop_answers = drop_answers
        self.connections = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                refuse = self.drop_connections > 0
                drop_answer = not refuse and self.drop_answers > 0
                if refuse:
                    self.drop_connections -= 1
                elif drop_answer:
                    self.drop_answers -= 1
            if refuse:
                client.close()
                continue
            threading.Thread(target=self._serve, args=(client, drop_answer), daemon=True).start()

    def _serve(self, client: socket.socket, drop_answer: bool) -> None:
        upstream = socket.create_connection(self.upstream)
        threading.Thread(target=_pipe, args=(client, upstream), daemon=True).start()
        if drop_answer:
            with contextlib.suppress(OSError):
                upstream.recv(1)  # the server has answered: the work is done
            # shutdown, not close alone: the other thread's recv holds the socket open, and the
            # client would hear nothing until its read timeout.
            for sock in (client, upstream):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            return
        _pipe(upstream, client)


def _pipe(source: socket.socket, target: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            target.sendall(data)
    for sock in (source, target):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
