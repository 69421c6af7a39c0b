"""Only regular files move: symbolic links, FIFOs, sockets, devices and directories are refused
at the first step of a download or an upload, at once, with a 4xx in the one error shape; and a
download that fails midway ends at once.

The real guest agent runs on the host over a socketpair (as in test_agent.py) behind the real
host runtime (workers/host.py); the API's side runs on fakeredis, with the host's tasks played
from a thread (AnsweringCelery). No VM, no Celery worker.
"""

from __future__ import annotations

import importlib.util
import io
import os
import stat
import threading
import time
from pathlib import Path

import pytest

from api.app import create_app
from shoal import keys, protocol, queue, sessions, tenants, transfers
from shoal.errors import NotAFile, NotARegularFile
from shoal.settings import Settings
from shoal.use_cases import files as file_cases
from tests.unit.fakes import (
    AnsweringCelery,
    FakeVMManager,
    live_session,
    publish_heartbeat,
    unit_context,
)
from tests.unit.test_agent import AGENT, RunningAgent, give, make_root
from workers.agent_client import AgentError
from workers.host import HostRuntime

AT_ONCE_S = 1.0
TARGET = "/etc/hostname"


def load_agent_files():
    """vm-images/agent/files.py, imported under a name of its own."""
    spec = importlib.util.spec_from_file_location("agent_files", AGENT.parent / "files.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_specials(data: Path) -> dict[str, tuple[str, str]]:
    """Everything that is not a regular file, as user code could leave it in /mnt/data (the
    device as root could): name -> (agent error code, a word of the message)."""
    (data / "plain.txt").write_bytes(b"plain")
    os.symlink("plain.txt", data / "link-inside")
    os.symlink(TARGET, data / "link-outside")
    os.mkfifo(data / "fifo")
    os.mknod(data / "socket", stat.S_IFSOCK | 0o600)
    os.mknod(data / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    (data / "dir").mkdir()
    names = ["plain.txt", "link-inside", "link-outside", "fifo", "socket", "null", "dir"]
    give(*(data / n for n in names))
    return {
        "link-inside": (protocol.E_NOT_REGULAR, "symbolic link"),
        "link-outside": (protocol.E_NOT_REGULAR, "symbolic link"),
        "fifo": (protocol.E_NOT_REGULAR, "FIFO"),
        "socket": (protocol.E_NOT_REGULAR, "socket"),
        "null": (protocol.E_NOT_REGULAR, "device"),
        "dir": (protocol.E_IS_DIRECTORY, "directory"),
    }


def snapshot(data: Path, name: str) -> tuple:
    """What a special file is, to check a refused upload left it as it was."""
    st = os.lstat(data / name)
    target = os.readlink(data / name) if stat.S_ISLNK(st.st_mode) else None
    return stat.S_IFMT(st.st_mode), st.st_ino, st.st_rdev, target


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    root = make_root(tmp_path_factory)
    running = RunningAgent(root, root / "state")
    running.specials = make_specials(running.data)
    yield running
    running.close()


class Stack:
    """The API's context on fakeredis and a host runtime whose one VM's agent is `agent`."""

    def __init__(self, agent: RunningAgent) -> None:
        self.c = unit_context(celery=AnsweringCelery())
        publish_heartbeat(self.c.redis)
        self.vms = FakeVMManager()
        self.runtime = HostRuntime(
            self.c.settings, r=self.c.redis, rb=self.c.redis_bin, vms=self.vms
        )
        vm = self.vms.create("vm_1", None)
        vm.agent = agent.client
        self.entry = live_session(self.c)
        self.runtime.session_vm[self.entry["id"]] = "vm_1"
        self.c.redis.hset(keys.session(self.entry["id"]), "vm", "vm_1")
        celery = self.c.celery
        celery.answer(queue.GET_FILE.name, lambda task: self.runtime.get_file(**task.kwargs))
        celery.answer(queue.PUT_FILE.name, lambda task: self.runtime.put_file(**task.kwargs))
        celery.answer(queue.FILE_OP.name, lambda task: self.runtime.file_op(**task.kwargs))


@pytest.fixture()
def stack(agent):
    s = Stack(agent)
    yield s
    s.c.celery.join(30)
    assert agent.client.ping()["busy"] is False  # no transfer left hanging in the agent


# --- the agent -------------------------------------------------------------------------------
def test_the_agent_refuses_to_read_anything_but_a_regular_file(agent) -> None:
    for name, (code, word) in agent.specials.items():
        started = time.monotonic()
        with pytest.raises(AgentError) as info:
            agent.client.open_file(name)
        assert time.monotonic() - started < AT_ONCE_S, name  # a FIFO is never waited on
        assert info.value.code == code, (name, info.value)
        assert word in info.value.message and name in info.value.message
    assert agent.client.ping()["busy"] is False
    header, chunks = agent.client.open_file("plain.txt")
    assert header["type"] == "file" and b"".join(chunks) == b"plain"


def test_the_agent_refuses_to_write_over_anything_but_a_regular_file(agent) -> None:
    for name, (code, word) in agent.specials.items():
        before = snapshot(agent.data, name)
        with pytest.raises(AgentError) as info:
            agent.client.put_file(name, [b"overwritten"])
        assert info.value.code == code, (name, info.value)
        assert word in info.value.message
        assert snapshot(agent.data, name) == before, name
    assert (agent.data / "plain.txt").read_bytes() == b"plain"
    leftovers = [p for p in os.listdir(agent.data) if p.startswith(".shoal-upload-")]
    assert leftovers == []


def test_stat_and_list_still_show_what_is_there(agent) -> None:
    assert agent.client.stat("link-outside")["type"] == "symlink"
    assert agent.client.stat("fifo")["type"] == "other"
    assert agent.client.stat("dir")["type"] == "directory"
    types = {e["name"]: e["type"] for e in agent.client.list_files("")}
    assert types["fifo"] == "other" and types["link-inside"] == "symlink"


# --- the agent's file operations, against a swap between the check and the use --------------
@pytest.fixture()
def data_dir(tmp_path):
    files = load_agent_files()
    return files, files.DataDir(str(tmp_path)), tmp_path


def swapped_after_check(monkeypatch, files, swap) -> None:
    """Run `swap` once, right after the agent's first check of a path passed."""
    real = files.check_regular
    done: list[bool] = []

    def check_then_swap(st, path):
        real(st, path)
        if not done:
            done.append(True)
            swap()

    monkeypatch.setattr(files, "check_regular", check_then_swap)


@pytest.mark.parametrize("swap_in", ["fifo", "symlink"])
def test_a_read_refuses_what_was_swapped_in_after_the_check(data_dir, monkeypatch, swap_in):
    files, dd, root = data_dir
    target = root / "f"
    target.write_bytes(b"regular")

    def swap() -> None:
        target.unlink()
        if swap_in == "fifo":
            os.mkfifo(target)
        else:
            os.symlink(TARGET, target)

    swapped_after_check(monkeypatch, files, swap)
    outcome: dict = {}

    def read() -> None:
        try:
            dd.open_read("f")
        except files.FileOpError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(AT_ONCE_S * 2)
    if thread.is_alive():  # blocked opening the FIFO: release it, then fail
        os.close(os.open(target, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("the agent blocked opening a FIFO swapped in after its check")
    assert outcome["error"].code == protocol.E_NOT_REGULAR


def test_an_upload_refuses_a_fifo_made_at_its_target_meanwhile(data_dir) -> None:
    files, dd, root = data_dir
    upload = dd.open_write("t")
    os.mkfifo(root / "t")  # user code, while the upload's bytes arrive
    upload.write(b"bytes")
    with pytest.raises(files.FileOpError) as info:
        upload.commit()
    assert info.value.code == protocol.E_NOT_REGULAR
    assert stat.S_ISFIFO(os.lstat(root / "t").st_mode)
    assert os.listdir(root) == ["t"]  # the temporary file is gone


# --- the host and the API's use cases --------------------------------------------------------
def test_downloads_and_uploads_of_special_files_are_refused_at_once(agent, stack) -> None:
    expected = {protocol.E_NOT_REGULAR: NotARegularFile, protocol.E_IS_DIRECTORY: NotAFile}
    for name, (code, word) in agent.specials.items():
        started = time.monotonic()
        with pytest.raises(expected[code]) as info:
            file_cases.download_file(stack.c, stack.entry, name)
        assert time.monotonic() - started < AT_ONCE_S, name
        assert info.value.status == 400 and word in info.value.message

        started = time.monotonic()
        with pytest.raises(expected[code]):
            file_cases.upload_file(stack.c, stack.entry, name, iter([b"x" * 1000] * 50))
        assert time.monotonic() - started < AT_ONCE_S, name
    info, body = file_cases.download_file(stack.c, stack.entry, "plain.txt")
    assert info["size"] == 5 and b"".join(body) == b"plain"


def test_a_guest_lost_midway_through_a_download_ends_it_at_once(tmp_path_factory) -> None:
    root = make_root(tmp_path_factory)
    fresh = RunningAgent(root, root / "state")
    try:
        size = 64 * protocol.FILE_CHUNK
        (fresh.data / "big.bin").write_bytes(os.urandom(size))
        give(fresh.data / "big.bin")
        s = Stack(fresh)
        info, body = file_cases.download_file(s.c, s.entry, "big.bin")
        assert info["size"] == size
        received = len(next(body))
        fresh.proc.kill()  # the VM dies under the transfer
        started = time.monotonic()
        with pytest.raises(transfers.TransferAborted, match="AgentDisconnected"):
            for chunk in body:
                received += len(chunk)
        assert time.monotonic() - started < AT_ONCE_S
        assert received < size
        s.c.celery.join(30)
        assert s.vms.destroyed == {"vm_1": 1}
        assert sessions.load(s.c.redis, s.entry["id"])["state"] == sessions.LOST
    finally:
        fresh.close()


# --- over HTTP: both route families ----------------------------------------------------------
@pytest.fixture()
def http(stack):
    app = create_app(Settings(redis_url="redis://127.0.0.1:1/0", home="/tmp/shoal-unit"))
    app.extensions["shoal"] = stack.c
    key = tenants.create_key(stack.c.redis, stack.entry["tenant"])[1]
    stack.c.redis.set(
        keys.identifier(stack.entry["tenant"], stack.entry["pool"], "ident-1"), stack.entry["id"]
    )
    return app.test_client(), {"Authorization": f"Bearer {key}"}


def assert_refused(response, started: float, code: str) -> None:
    assert time.monotonic() - started < AT_ONCE_S
    assert response.status_code == 400, response.get_data(as_text=True)
    assert response.get_json()["error"]["code"] == code
    assert response.headers["x-ms-error-code"] == code


def test_every_download_route_answers_400_in_the_error_shape_at_once(agent, stack, http):
    client, headers = http
    pool = stack.entry["pool"]
    for name, (code, _) in agent.specials.items():
        expected = "NotAFile" if code == protocol.E_IS_DIRECTORY else "NotARegularFile"
        for url in (
            f"/v1/sessions/{stack.entry['id']}/files/{name}",
            f"/pools/{pool}/files/{name}/content?identifier=ident-1",
            f"/pools/{pool}/files/content/{name}?identifier=ident-1",
        ):
            started = time.monotonic()
            assert_refused(client.get(url, headers=headers), started, expected)


def test_every_upload_route_refuses_to_write_over_a_special_file(agent, stack, http):
    client, headers = http
    pool = stack.entry["pool"]
    for name in ("link-outside", "fifo"):
        before = snapshot(agent.data, name)
        started = time.monotonic()
        put = client.put(
            f"/v1/sessions/{stack.entry['id']}/files/{name}", data=b"x", headers=headers
        )
        assert_refused(put, started, "NotARegularFile")
        for url in (f"/v1/sessions/{stack.entry['id']}/files", f"/pools/{pool}/files/upload"):
            started = time.monotonic()
            posted = client.post(
                url + ("?identifier=ident-1" if url.startswith("/pools") else ""),
                data={"file": (io.BytesIO(b"x"), name)},
                headers=headers,
                content_type="multipart/form-data",
            )
            assert_refused(posted, started, "NotARegularFile")
        assert snapshot(agent.data, name) == before
