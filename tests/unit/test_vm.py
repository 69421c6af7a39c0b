"""How a VM handle reacts to a hostile or dead guest, with a fake guest on a socketpair.

The real AgentClient talks to a thread playing the guest; the VM's manager is a stub that
records the destroy. A guest that floods, sends garbage, stays silent or hangs up must end in
a destroyed VM and VMLost, quickly; a refused request must leave the VM alone.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from shoal import protocol
from shoal.settings import Settings
from workers.agent_client import AgentClient
from workers.domain import VMPaths
from workers.vm import VM, VMSpec
from workers.vm_errors import AgentRefused, VMLost

OK_ANSWER = {
    "ok": True,
    "status": "ok",
    "stdout": "2\n",
    "stderr": "",
    "stdout_truncated": False,
    "stderr_truncated": False,
    "result": None,
    "outputs": [],
    "error": None,
    "exit_code": None,
    "interpreter_restarted": False,
    "duration_ms": 1.0,
}


class StubManager:
    def __init__(self) -> None:
        self.settings = Settings(interrupt_grace_s=0.2)
        self.lost: list[str] = []

    def _lose(self, vm: VM, reason: str) -> None:
        vm.lost_reason = vm.lost_reason or reason
        self.lost.append(reason)
        vm.agent.close()


def read_request(sock: socket.socket) -> dict:
    header = b""
    while len(header) < protocol.HEADER.size:
        header += sock.recv(protocol.HEADER.size - len(header))
    json_len, _ = protocol.parse_header(header, protocol.MAX_JSON_TO_GUEST)
    body = b""
    while len(body) < json_len:
        body += sock.recv(json_len - len(body))
    return protocol.parse_body(body)


def make_vm(guest) -> tuple[VM, StubManager, threading.Thread]:
    host_end, guest_end = socket.socketpair()
    agent = AgentClient(host_end, interrupt_grace_s=0.1, answer_margin_s=0.1)
    manager = StubManager()
    vm = VM(
        manager,  # type: ignore[arg-type]
        "s-1",
        "0123456789ab",
        "shoal-x-h-0123456789ab",
        "u",
        VMPaths(Path("/nonexistent")),
        VMSpec(),
        True,
        agent,
    )

    def play() -> None:
        try:
            guest(guest_end)
        except OSError:
            pass
        finally:
            guest_end.close()

    thread = threading.Thread(target=play, daemon=True)
    thread.start()
    return vm, manager, thread


def test_an_answer_passes_through():
    def guest(sock):
        request = read_request(sock)
        sock.sendall(protocol.encode({**OK_ANSWER, "id": request["id"]}))
        time.sleep(0.2)

    vm, manager, _ = make_vm(guest)
    assert vm.execute("1+1", timeout_s=5)["stdout"] == "2\n"
    assert manager.lost == []


def test_garbage_from_the_guest_destroys_the_vm():
    def guest(sock):
        read_request(sock)
        sock.sendall(b"GARBAGE" * 100)
        time.sleep(1)

    vm, manager, _ = make_vm(guest)
    with pytest.raises(VMLost, match="broke the agent protocol"):
        vm.execute("1", timeout_s=5)
    assert len(manager.lost) == 1


def test_an_oversized_frame_is_refused_before_it_is_read():
    def guest(sock):
        read_request(sock)
        sock.sendall(protocol.HEADER.pack(protocol.MAGIC, protocol.MAX_JSON_FROM_GUEST + 1, 0))
        sock.sendall(b"x" * (1 << 20))  # the start of a flood the host must not buffer
        time.sleep(1)

    vm, manager, _ = make_vm(guest)
    started = time.monotonic()
    with pytest.raises(VMLost, match="over the"):
        vm.execute("1", timeout_s=5)
    assert time.monotonic() - started < 2
    assert manager.lost


def test_a_flood_of_valid_frames_for_nobody_ends_at_the_deadline():
    stop = threading.Event()

    def guest(sock):
        read_request(sock)
        frame = protocol.encode({"id": 999, "ok": True, "pad": "x" * 60000})
        while not stop.is_set():
            sock.sendall(frame)

    vm, manager, _ = make_vm(guest)
    started = time.monotonic()
    with pytest.raises(VMLost):
        vm.execute("1", timeout_s=0.3)
    stop.set()
    assert time.monotonic() - started < 3  # timeout + agent grace + host grace, not forever
    assert manager.lost


def test_a_silent_guest_is_destroyed_after_timeout_and_grace():
    def guest(sock):
        read_request(sock)
        time.sleep(5)

    vm, manager, _ = make_vm(guest)
    started = time.monotonic()
    with pytest.raises(VMLost, match="did not end within"):
        vm.execute("while True: pass", timeout_s=0.3)
    assert 0.3 < time.monotonic() - started < 2
    assert manager.lost
    with pytest.raises(VMLost):  # and it stays lost
        vm.execute("1", timeout_s=1)


def test_a_guest_that_hangs_up_loses_the_vm():
    def guest(sock):
        read_request(sock)

    vm, manager, _ = make_vm(guest)
    with pytest.raises(VMLost, match="channel closed"):
        vm.execute("1", timeout_s=5)
    assert manager.lost


def test_a_refusal_leaves_the_vm_alone():
    def guest(sock):
        request = read_request(sock)
        sock.sendall(protocol.encode(protocol.error_message(request["id"], "busy", "busy")))
        time.sleep(0.2)

    vm, manager, _ = make_vm(guest)
    with pytest.raises(AgentRefused) as info:
        vm.execute("1", timeout_s=5)
    assert info.value.code == "busy"
    assert manager.lost == []
