"""Malformed frames from a guest, of every kind (depth, size, encoding, shape, order): each is a
protocol error that loses that VM (VMLost, the VM marked lost), never an exception of another
kind on the host. A fake guest on a socketpair answers the host's request with the frame.
"""

from __future__ import annotations

import json
import socket
import struct

import pytest

from shoal import protocol
from tests.unit.test_vm import OK_ANSWER, assert_lost, make_vm, read_request
from workers.agent_client import AgentClient, AgentProtocolError
from workers.vm_errors import VMLost

HEADER = protocol.HEADER


def raw_frame(body: bytes, blob: bytes = b"", json_len: int | None = None) -> bytes:
    size = len(body) if json_len is None else json_len
    return HEADER.pack(protocol.MAGIC, size, len(blob)) + body + blob


def answer_body(rid: int, **changes) -> bytes:
    return json.dumps({**OK_ANSWER, "id": rid, **changes}).encode()


def with_field(raw: str):
    """An OK answer whose stdout is the raw JSON text `raw`, spliced in unparsed."""
    return lambda rid: answer_body(rid, stdout="@@").replace(b'"@@"', raw.encode())


MALFORMED = {
    # depth
    "nested past the decoder's stack": with_field("[" * 100_000 + "]" * 100_000),
    # encoding
    "invalid UTF-8": lambda rid: answer_body(rid, stdout="@@").replace(b'"@@"', b'"\xff\xfe"'),
    "UTF-16 instead of UTF-8": lambda rid: answer_body(rid).decode().encode("utf-16"),
    "a lone surrogate escape": with_field('"\\ud800"'),
    "NaN": lambda rid: answer_body(rid).replace(b'"duration_ms": 1.0', b'"duration_ms": NaN'),
    "Infinity": lambda rid: answer_body(rid).replace(
        b'"duration_ms": 1.0', b'"duration_ms": -Infinity'
    ),
    "an integer of 10,000 digits": lambda rid: answer_body(rid).replace(
        b'"duration_ms": 1.0', b'"duration_ms": ' + b"9" * 10_000
    ),
    "not JSON at all": lambda rid: b"\x00" * 64,
    # shape
    "a JSON array": lambda rid: b"[1, 2]",
    "an id that is a string": lambda rid: answer_body(rid).replace(
        f'"id": {rid}'.encode(), f'"id": "{rid}"'.encode()
    ),
    "no ok": lambda rid: json.dumps(
        {k: v for k, v in json.loads(answer_body(rid)).items() if k != "ok"}
    ).encode(),
    "ok that is not a boolean": lambda rid: answer_body(rid, ok="yes"),
    "an error of the wrong shape": lambda rid: json.dumps(
        {"id": rid, "ok": False, "error": "no"}
    ).encode(),
    "an unknown status": lambda rid: answer_body(rid, status="exploded"),
    "stdout that is a number": lambda rid: answer_body(rid, stdout=3),
    "outputs that are not a list": lambda rid: answer_body(rid, outputs={"a": 1}),
    "an output without data": lambda rid: answer_body(rid, outputs=[{"type": "display"}]),
    "a result that is a list": lambda rid: answer_body(rid, result=["text/plain", "x"]),
    "duration that is text": lambda rid: answer_body(rid, duration_ms="1"),
    "interpreter_restarted missing": lambda rid: json.dumps(
        {k: v for k, v in json.loads(answer_body(rid)).items() if k != "interpreter_restarted"}
    ).encode(),
    # order
    "a chunk frame in place of the answer": lambda rid: json.dumps(
        {"id": rid, "op": "chunk"}
    ).encode(),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_a_malformed_answer_loses_the_vm(kind):
    make_body = MALFORMED[kind]

    def guest(sock):
        request = read_request(sock)
        sock.sendall(raw_frame(make_body(request["id"])))
        sock.recv(1)  # stay connected until the host hangs up

    vm, _ = make_vm(guest)
    with pytest.raises(VMLost, match="broke the agent protocol"):
        vm.execute("1", timeout_s=5)
    assert_lost(vm)


@pytest.mark.parametrize(
    "header",
    [
        HEADER.pack(b"SHL2", 10, 0),
        HEADER.pack(protocol.MAGIC, protocol.MAX_JSON_FROM_GUEST + 1, 0),
        HEADER.pack(protocol.MAGIC, 10, protocol.MAX_BLOB + 1),
        struct.pack(">4sII", protocol.MAGIC, 0xFFFFFFFF, 0xFFFFFFFF),
    ],
    ids=["bad magic", "JSON over its limit", "blob over its limit", "lengths at their maximum"],
)
def test_a_header_over_the_bounds_loses_the_vm_before_the_body_is_read(header):
    def guest(sock):
        read_request(sock)
        sock.sendall(header)
        sock.recv(1)

    vm, _ = make_vm(guest)
    with pytest.raises(VMLost, match="broke the agent protocol"):
        vm.execute("1", timeout_s=5)
    assert_lost(vm)


def test_half_a_frame_then_a_hang_up_loses_the_vm():
    def guest(sock):
        request = read_request(sock)
        sock.sendall(raw_frame(answer_body(request["id"]))[:30])

    vm, _ = make_vm(guest)
    with pytest.raises(VMLost, match="channel closed"):
        vm.execute("1", timeout_s=5)
    assert_lost(vm)


def test_deep_json_data_within_the_frame_limits_is_dropped_with_a_note():
    """application/json nested past MAX_JSON_DEPTH parses, but is not passed on: every later
    layer (the record, the API, a client) would have to survive it."""
    deep = "[" * (protocol.MAX_JSON_DEPTH + 1) + "]" * (protocol.MAX_JSON_DEPTH + 1)

    def guest(sock):
        request = read_request(sock)
        body = answer_body(request["id"]).replace(
            b'"result": null', b'"result": {"application/json": ' + deep.encode() + b"}"
        )
        sock.sendall(raw_frame(body))
        sock.recv(1)

    vm, _ = make_vm(guest)
    answer = vm.execute("1", timeout_s=5)
    assert answer["result"] is None and answer["result_truncated"] is True
    assert any("nested deeper" in note for note in answer["output_notes"])
    assert vm.lost_reason is None
    json.dumps(answer)  # the record can hold it


def file_client() -> tuple[AgentClient, socket.socket]:
    host_end, guest_end = socket.socketpair()
    return AgentClient(host_end, timeout_s=5), guest_end


def test_a_file_put_answered_without_its_go_ahead_is_a_protocol_error():
    import threading

    client, guest_end = file_client()

    def guest():
        request = read_request(guest_end)
        guest_end.sendall(protocol.encode({"id": request["id"], "ok": True, "size": 1}))

    threading.Thread(target=guest, daemon=True).start()
    with pytest.raises(AgentProtocolError, match="no go-ahead"):
        client.put_file("a.txt", [b"x"])
    client.close()


def test_a_download_that_gets_an_execute_answer_for_a_chunk_is_a_protocol_error():
    import threading

    client, guest_end = file_client()
    entry = {"path": "a", "name": "a", "type": "file", "size": 1, "mtime": 0.0}

    def guest():
        request = read_request(guest_end)
        guest_end.sendall(protocol.encode({"id": request["id"], "ok": True, **entry}))
        guest_end.sendall(protocol.encode({**OK_ANSWER, "id": request["id"]}))
        guest_end.recv(1 << 16)

    threading.Thread(target=guest, daemon=True).start()
    with pytest.raises(AgentProtocolError, match="expected a chunk"):
        b"".join(client.get_file("a"))
    client.close()
