"""How a VM handle reacts to a hostile or dead guest, with a fake guest on a socketpair, and
how its owner, the host runtime, then destroys it.

The real AgentClient talks to a thread playing the guest. A guest that floods, sends garbage,
stays silent or hangs up must end, quickly, in VMLost and a VM marked lost that refuses every
later call; a refused request must leave the VM alone. The VM never destroys itself: the host
runtime (here with fakeredis and a stub manager that counts destroys) destroys a lost VM once.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import fakeredis
import pytest

from shoal import executions, keys, protocol, sessions
from shoal.pools import get_pool
from shoal.settings import Settings
from tests.unit.fakes import FakeForkBases
from workers.agent_client import AgentClient
from workers.domain import VMPaths
from workers.host import HostRuntime
from workers.running_vm import VM, VMSpec
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
VM_ID = "vm_0123"


class StubManager:
    """Stands in for VMManager where the host runtime uses it: it hands out one VM and counts
    the destroys."""

    def __init__(self, vm: VM | None = None) -> None:
        self.vm = vm
        self.destroyed: list[str] = []
        self.fork_bases = FakeForkBases()

    def get(self, vm_id: str) -> VM | None:
        return self.vm if self.vm is not None and vm_id == self.vm.vm_id else None

    def create(self, vm_id: str, spec: VMSpec) -> VM:
        assert self.vm is not None and vm_id == self.vm.vm_id
        return self.vm

    def paused_on_full_disk(self, vm_id: str) -> bool:
        return False

    def is_asleep(self, vm_id: str) -> bool:
        return False

    def ensure_template(self, spec: VMSpec) -> None:
        pass

    def destroy(self, vm_id: str) -> None:
        self.destroyed.append(vm_id)
        if self.vm is not None and vm_id == self.vm.vm_id:
            self.vm.lost_reason = self.vm.lost_reason or "the VM was destroyed"
            self.vm.agent.close()


def read_request(sock: socket.socket) -> dict:
    header = b""
    while len(header) < protocol.HEADER.size:
        header += sock.recv(protocol.HEADER.size - len(header))
    json_len, _ = protocol.parse_header(header, protocol.MAX_JSON_TO_GUEST)
    body = b""
    while len(body) < json_len:
        body += sock.recv(json_len - len(body))
    return protocol.parse_body(body)


def make_vm(guest, vm_id: str = VM_ID) -> tuple[VM, threading.Thread]:
    host_end, guest_end = socket.socketpair()
    agent = AgentClient(host_end, interrupt_grace_s=0.1, answer_margin_s=0.1)
    vm = VM(
        Settings(interrupt_grace_s=0.2),
        vm_id,
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
    return vm, thread


def assert_lost(vm: VM) -> None:
    """Marked lost once, its channel closed, every later call refused."""
    assert vm.lost_reason
    with pytest.raises(VMLost, match=vm.lost_reason[:20]):
        vm.execute("1", timeout_s=1)


def test_an_answer_passes_through():
    def guest(sock):
        request = read_request(sock)
        sock.sendall(protocol.encode({**OK_ANSWER, "id": request["id"]}))
        time.sleep(0.2)

    vm, _ = make_vm(guest)
    assert vm.execute("1+1", timeout_s=5)["stdout"] == "2\n"
    assert vm.lost_reason is None


def test_garbage_from_the_guest_loses_the_vm():
    def guest(sock):
        read_request(sock)
        sock.sendall(b"GARBAGE" * 100)
        time.sleep(1)

    vm, _ = make_vm(guest)
    with pytest.raises(VMLost, match="broke the agent protocol"):
        vm.execute("1", timeout_s=5)
    assert_lost(vm)


def test_an_oversized_frame_is_refused_before_it_is_read():
    def guest(sock):
        read_request(sock)
        sock.sendall(protocol.HEADER.pack(protocol.MAGIC, protocol.MAX_JSON_FROM_GUEST + 1, 0))
        sock.sendall(b"x" * (1 << 20))  # the start of a flood the host must not buffer
        time.sleep(1)

    vm, _ = make_vm(guest)
    started = time.monotonic()
    with pytest.raises(VMLost, match="over the"):
        vm.execute("1", timeout_s=5)
    assert time.monotonic() - started < 2
    assert_lost(vm)


def test_a_flood_of_valid_frames_for_nobody_ends_at_the_deadline():
    stop = threading.Event()

    def guest(sock):
        read_request(sock)
        frame = protocol.encode({"id": 999, "ok": True, "pad": "x" * 60000})
        while not stop.is_set():
            sock.sendall(frame)

    vm, _ = make_vm(guest)
    started = time.monotonic()
    with pytest.raises(VMLost):
        vm.execute("1", timeout_s=0.3)
    stop.set()
    assert time.monotonic() - started < 3  # timeout + agent grace + host grace, not forever
    assert_lost(vm)


def test_a_silent_guest_is_lost_after_timeout_and_grace():
    def guest(sock):
        read_request(sock)
        time.sleep(5)

    vm, _ = make_vm(guest)
    started = time.monotonic()
    with pytest.raises(VMLost, match="did not end within"):
        vm.execute("while True: pass", timeout_s=0.3)
    assert 0.3 < time.monotonic() - started < 2
    assert_lost(vm)


def test_a_guest_that_hangs_up_loses_the_vm():
    def guest(sock):
        read_request(sock)

    vm, _ = make_vm(guest)
    with pytest.raises(VMLost, match="channel closed"):
        vm.execute("1", timeout_s=5)
    assert_lost(vm)


def test_a_refusal_leaves_the_vm_alone():
    def guest(sock):
        request = read_request(sock)
        sock.sendall(protocol.encode(protocol.error_message(request["id"], "busy", "busy")))
        time.sleep(0.2)

    vm, _ = make_vm(guest)
    with pytest.raises(AgentRefused) as info:
        vm.execute("1", timeout_s=5)
    assert info.value.code == "busy"
    assert vm.lost_reason is None


# --- the owner: the host runtime destroys a lost VM, once ----------------------------------


def garbage_guest(sock: socket.socket) -> None:
    read_request(sock)
    sock.sendall(b"GARBAGE" * 100)
    time.sleep(1)


@pytest.fixture
def runtime(tmp_path) -> HostRuntime:
    settings = Settings(redis_url="redis://127.0.0.1:1/0", home=str(tmp_path), host_name="h1")
    return HostRuntime(settings, r=fakeredis.FakeRedis(decode_responses=True))


def lost_session(rt: HostRuntime, guest) -> tuple[str, StubManager]:
    vm, _ = make_vm(guest)
    rt.vms = StubManager(vm)  # type: ignore[assignment]
    session_id = "ses_1"
    rt.r.hset(keys.session(session_id), mapping={"vm": VM_ID, "state": sessions.ACTIVE})
    return session_id, rt.vms


def test_the_host_destroys_a_vm_lost_in_an_execution_once(runtime):
    session_id, manager = lost_session(runtime, garbage_guest)
    session = {"id": session_id, "tenant": "acme", "host": "h1"}
    record = executions.new_record(session, "1", "python", 5, 100, 1)
    runtime.execute(record["id"], "default", json.dumps(record))
    assert manager.destroyed == [VM_ID]
    final = executions.load(runtime.r, record["id"])
    assert final["status"] == executions.LOST
    assert "broke the agent protocol" in final["stderr"]
    assert runtime.r.hget(keys.session(session_id), "state") == sessions.LOST


def test_the_host_destroys_a_vm_lost_in_a_file_operation_once(runtime):
    session_id, manager = lost_session(runtime, garbage_guest)
    runtime.file_op(session_id, "list", {}, "reply:1", "default")
    assert manager.destroyed == [VM_ID]
    assert json.loads(runtime.r.lpop("reply:1"))["ok"] is False
    assert runtime.r.hget(keys.session(session_id), "state") == sessions.LOST


def test_a_ready_vm_lost_while_warming_up_is_destroyed_once(runtime):
    _session_id, manager = lost_session(runtime, garbage_guest)
    with pytest.raises(VMLost):
        runtime._start_ready_vm(VM_ID, get_pool(runtime.settings, "default"))
    assert manager.destroyed == [VM_ID]
