"""Uploads through the transfer disk: the real agent (as in test_agent.py, on this host) reading
a file the host side writes (workers/transfer_disk.py), and what a hostile peer on either side
of that protocol gets."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from shoal import protocol
from shoal.settings import Settings
from tests.unit.test_agent import RunningAgent, make_root, read_raw
from workers import domain as dom
from workers import transfer_disk
from workers.agent_client import AgentClient, AgentError, AgentProtocolError, AgentTimeout
from workers.running_vm import VM
from workers.vm_identity import VMIdentity

SEGMENT = protocol.TRANSFER_SEGMENT


@pytest.fixture(scope="module")
def disk_path(tmp_path_factory) -> Path:
    path = make_root(tmp_path_factory) / "transfer.img"
    transfer_disk.create(path, VMIdentity(os.getuid(), os.getgid()))
    return path


@pytest.fixture(scope="module")
def disk_agent(tmp_path_factory, disk_path):
    root = make_root(tmp_path_factory)
    running = RunningAgent(root, root / "state", "--transfer-disk", str(disk_path))
    assert running.client.hello(packages=False)["transfer_disk"] is True
    assert running.client.has_transfer_disk
    yield running
    running.close()


def upload(agent: RunningAgent, disk_path: Path, path: str, chunks) -> dict:
    with transfer_disk.Writer(disk_path) as writer:
        return agent.client.put_file_via_disk(path, writer.segments(chunks))


def test_create_makes_a_sparse_root_file_the_vm_may_only_read(disk_path):
    st = disk_path.stat()
    assert st.st_size == protocol.TRANSFER_DISK_BYTES
    assert st.st_mode & 0o777 == 0o640 and st.st_uid == 0
    assert st.st_blocks == 0
    with pytest.raises(FileExistsError):
        transfer_disk.create(disk_path, VMIdentity(1, 1))


def test_segments_go_round_the_ring(tmp_path):
    path = tmp_path / "t.img"
    transfer_disk.create(path, VMIdentity(0, 0))
    payload = os.urandom(SEGMENT * (protocol.TRANSFER_SLOTS + 1) + 5)
    with transfer_disk.Writer(path) as writer:
        seen = []
        for offset, length in writer.segments(
            [payload[i : i + 300_001] for i in range(0, len(payload), 300_001)]
        ):
            with open(path, "rb") as f:
                f.seek(offset)
                assert f.read(length) == payload[len(seen) * SEGMENT :][:length]
            seen.append((offset, length))
    slots = protocol.TRANSFER_SLOTS
    assert seen[:slots] == [(i * SEGMENT, SEGMENT) for i in range(slots)]
    assert seen[slots:] == [(0, SEGMENT), (SEGMENT, 5)]  # wrapped round
    assert path.stat().st_size == protocol.TRANSFER_DISK_BYTES
    assert path.stat().st_blocks == 0  # emptied on exit


def test_upload_through_the_disk_wraps_the_ring_and_arrives_whole(disk_agent, disk_path):
    payload = os.urandom(protocol.TRANSFER_DISK_BYTES + 3 * SEGMENT + 777)
    pieces = [
        payload[i : i + protocol.FILE_CHUNK] for i in range(0, len(payload), protocol.FILE_CHUNK)
    ]
    info = upload(disk_agent, disk_path, "big/data.bin", pieces)
    assert info["size"] == len(payload) and info["path"] == "big/data.bin"
    stored = (disk_agent.data / "big/data.bin").read_bytes()
    assert hashlib.sha256(stored).digest() == hashlib.sha256(payload).digest()
    assert upload(disk_agent, disk_path, "big/empty", [])["size"] == 0
    assert upload(disk_agent, disk_path, "big/tiny", [b"abc"])["size"] == 3
    assert (disk_agent.data / "big/tiny").read_bytes() == b"abc"
    assert disk_path.stat().st_blocks == 0
    assert disk_agent.client.ping()["busy"] is False


def test_a_refused_path_is_refused_before_any_byte(disk_agent, disk_path):
    (disk_agent.data / "adir").mkdir(exist_ok=True)
    with pytest.raises(AgentError) as info:
        upload(disk_agent, disk_path, "adir", [b"x" * 10])
    assert info.value.code == protocol.E_IS_DIRECTORY
    with pytest.raises(AgentError) as info:
        upload(disk_agent, disk_path, "../escape", [b"x"])
    assert info.value.code == protocol.E_PATH_OUTSIDE
    assert disk_agent.client.ping()["busy"] is False


def test_an_abandoned_disk_upload_leaves_nothing(disk_agent, disk_path):
    def source():
        yield os.urandom(SEGMENT + 10)
        raise ValueError("the client went away")

    with pytest.raises(ValueError):
        upload(disk_agent, disk_path, "abandoned.bin", source())
    names = [e["name"] for e in disk_agent.client.list_files("", recursive=True)]
    assert not any("abandoned" in n or n.startswith(".shoal") for n in names), names
    assert upload(disk_agent, disk_path, "after.bin", [b"ok"])["size"] == 2


def hostile_put(client: AgentClient, chunks: list[tuple[dict, bytes]]) -> dict:
    """A file_put via the disk whose chunks are `chunks` as given, then eof: the first error
    the agent answers, or its final answer."""
    rid = client._start({"op": protocol.OP_FILE_PUT, "path": "hostile.bin", "via_disk": True})
    try:
        assert client._answer(rid, time.monotonic() + 10)["ready"] is True
        for fields, blob in chunks:
            client._send(protocol.encode({"id": rid, "op": protocol.OP_CHUNK, **fields}, blob), 5)
        client._send(protocol.encode({"id": rid, "op": protocol.OP_CHUNK, "eof": True}), 5)
        return client._answer(rid, time.monotonic() + 10)
    finally:
        client._finish(rid)


@pytest.mark.parametrize(
    "fields, blob",
    [
        ({"disk": [protocol.TRANSFER_DISK_BYTES - 512, 1024]}, b""),  # ends past the disk
        ({"disk": [-512, 512]}, b""),
        ({"disk": [100, 512]}, b""),  # not block-aligned
        ({"disk": [0, SEGMENT + 512]}, b""),  # longer than a segment
        ({"disk": [0, 0]}, b""),
        ({"disk": [0, True]}, b""),
        ({"disk": ["0", 5]}, b""),
        ({"disk": [0]}, b""),
        ({"disk": {"offset": 0}}, b""),
        ({"disk": [0, 5]}, b"bytes too"),  # a disk chunk carries no bytes
        ({}, b"bytes instead of a range"),
    ],
)
def test_a_bad_disk_chunk_is_refused_and_leaves_nothing(disk_agent, fields, blob):
    with pytest.raises(AgentError) as info:
        hostile_put(disk_agent.client, [(fields, blob)])
    assert info.value.code == protocol.E_INVALID
    assert not (disk_agent.data / "hostile.bin").exists()
    names = [e["name"] for e in disk_agent.client.list_files("")]
    assert not any(n.startswith(".shoal") for n in names), names
    assert disk_agent.client.ping()["busy"] is False


def test_an_agent_without_a_disk_refuses_a_disk_upload(tmp_path_factory):
    root = make_root(tmp_path_factory)
    running = RunningAgent(root, root / "state")
    try:
        assert running.client.hello(packages=False)["transfer_disk"] is False
        assert not running.client.has_transfer_disk
        with pytest.raises(AgentError) as info:
            running.client.put_file_via_disk("x.bin", iter([(0, 5)]))
        assert info.value.code == protocol.E_INVALID
        assert "no transfer disk" in info.value.message
    finally:
        running.close()


def test_the_host_refuses_a_guest_that_answers_a_segment_with_something_else():
    host, guest = socket.socketpair()
    client = AgentClient(host, timeout_s=5)

    def serve():
        request = read_raw(guest)
        rid = request["id"]
        guest.sendall(protocol.encode({"id": rid, "ok": True, "ready": True}))
        read_raw(guest)  # the first segment
        guest.sendall(protocol.encode({"id": rid, "ok": True, "op": "chunk", "copied": "yes"}))

    threading.Thread(target=serve, daemon=True).start()
    segments = iter([(i * SEGMENT, SEGMENT) for i in range(protocol.TRANSFER_SLOTS + 1)])
    try:
        with pytest.raises(AgentProtocolError, match="copied"):
            client.put_file_via_disk("x.bin", segments)
    finally:
        client.close()
        guest.close()


def fake_guest_put(serve) -> tuple[AgentClient, socket.socket]:
    """A client whose guest is `serve(guest_socket, request_id)`, run in a thread after the
    go-ahead to a file_put."""
    host, guest = socket.socketpair()
    client = AgentClient(host, timeout_s=2)

    def run():
        rid = read_raw(guest)["id"]
        guest.sendall(protocol.encode({"id": rid, "ok": True, "ready": True}))
        serve(guest, rid)

    threading.Thread(target=run, daemon=True).start()
    return client, guest


def test_a_guest_that_never_copies_times_out_and_the_disk_is_emptied(disk_path):
    client, guest = fake_guest_put(lambda g, rid: None)
    payload = [os.urandom(SEGMENT)] * (protocol.TRANSFER_SLOTS + 1)
    try:
        with pytest.raises(AgentTimeout), transfer_disk.Writer(disk_path) as writer:
            client.put_file_via_disk("x.bin", writer.segments(payload))
        assert disk_path.stat().st_blocks == 0
    finally:
        client.close()
        guest.close()


def test_a_refused_segment_ends_the_request_with_eof_so_the_agent_is_free():
    frames = []

    def serve(g, rid):
        frames.append(read_raw(g))
        refusal = {"id": rid, "ok": False, "error": {"code": "no_space", "message": "full"}}
        g.sendall(protocol.encode(refusal))
        while not frames[-1].get("eof"):
            frames.append(read_raw(g))

    client, guest = fake_guest_put(serve)
    try:
        segments = iter([(i * SEGMENT, SEGMENT) for i in range(3 * protocol.TRANSFER_SLOTS)])
        with pytest.raises(AgentError) as info:
            client.put_file_via_disk("x.bin", segments)
        assert info.value.code == "no_space"
        deadline = time.monotonic() + 5
        while not (frames and frames[-1].get("eof")) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert frames[-1].get("eof") is True
        assert len(frames) <= protocol.TRANSFER_SLOTS + 1  # it stopped at the refusal
    finally:
        client.close()
        guest.close()


class RecordingAgent:
    def __init__(self, has_transfer_disk: bool):
        self.has_transfer_disk = has_transfer_disk
        self.calls: list[str] = []

    def put_file(self, path, chunks):
        self.calls.append("channel")
        return {"size": sum(len(c) for c in chunks)}

    def put_file_via_disk(self, path, segments):
        self.calls.append("disk")
        return {"size": sum(length for _offset, length in segments)}


@pytest.mark.parametrize(
    "agent_has_it, file_exists, way",
    [(True, True, "disk"), (False, True, "channel"), (True, False, "channel")],
)
def test_a_vm_uploads_through_its_disk_only_when_the_guest_and_the_host_both_have_it(
    tmp_path, agent_has_it, file_exists, way
):
    paths = dom.VMPaths(tmp_path)
    if file_exists:
        transfer_disk.create(paths.transfer_disk, VMIdentity(0, 0))
    agent = RecordingAgent(agent_has_it)
    vm = VM(Settings(), "vm-1", "0123456789ab", "d", "u", paths, None, True, agent)
    assert vm.put_file("f.bin", [b"x" * 1000, b"y" * 24])["size"] == 1024
    assert agent.calls == [way]
