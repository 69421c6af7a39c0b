"""Template memory shared without being writable: the sealed memfd, the broker that hands it to
exactly the uid it expects, and the emulator wrapper's argument rewrite. The handoff runs a real
process under another uid (the tests need root, as the worker does)."""

from __future__ import annotations

import json
import mmap
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from workers import qemu_wrapper, template_memory
from workers.template_memory import Grant, MemoryBroker

WRAPPER_SOURCE = Path(qemu_wrapper.__file__).read_text()
VM_UID, OTHER_UID = 900_901, 900_902

# Run as a VM uid: receive the fd as the wrapper does, then try what an escaped QEMU would.
PROBE = """
import errno, mmap
fd, shared = receive(sys.argv[1])
reopened = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)  # what QEMU 7.2 does with mem-path
tries = {}
for what, attempt in [
    ("write", lambda: os.pwrite(reopened, b"x", 0)),
    ("truncate", lambda: os.ftruncate(reopened, 0)),
    ("shared_map", lambda: mmap.mmap(reopened, 4096, mmap.MAP_SHARED)),
]:
    try:
        attempt()
        tries[what] = "done"
    except OSError as exc:
        tries[what] = errno.errorcode[exc.errno]
private = mmap.mmap(reopened, 4096, mmap.MAP_PRIVATE)
private[:4] = b"MINE"
print(json.dumps({"shared": shared, "tries": tries, "private": private[:8].decode(),
                  "file": os.pread(reopened, 8, 0).decode()}))
"""


def run_as(uid: int, socket_path: Path) -> subprocess.CompletedProcess:
    source = WRAPPER_SOURCE.replace('if __name__ == "__main__":', "if False:") + PROBE
    return subprocess.run(
        ["/usr/bin/python3", "-I", "-c", source, str(socket_path)],
        user=uid,
        group=uid,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.fixture()
def broker() -> Iterator[MemoryBroker]:
    # Under /tmp itself: pytest's tmp_path is root's 0700, which a VM uid cannot traverse.
    folder = Path(tempfile.mkdtemp(prefix="shoal-memory-"))
    folder.chmod(0o711)
    found = MemoryBroker(folder / "memory.sock")
    found.start()
    yield found
    found.stop()
    shutil.rmtree(folder)


@pytest.fixture()
def template_fd(tmp_path: Path) -> Iterator[int]:
    memory = tmp_path / "memory.ram"
    memory.write_bytes(b"TEMPLATE" * 4096)
    fd = template_memory.sealed_copy(memory, "template")
    yield fd
    os.close(fd)


def test_a_sealed_copy_holds_the_file_and_refuses_every_write(template_fd: int) -> None:
    assert template_memory.is_sealed_read_only(template_fd)
    assert os.pread(template_fd, 16, 0) == b"TEMPLATETEMPLATE"
    with pytest.raises(PermissionError):
        os.pwrite(template_fd, b"x", 0)
    with pytest.raises(PermissionError):
        os.ftruncate(template_fd, 4096)
    with pytest.raises(PermissionError):
        mmap.mmap(template_fd, 4096, mmap.MAP_SHARED)
    private = mmap.mmap(template_fd, 4096, mmap.MAP_PRIVATE)
    private[:4] = b"MINE"  # copy-on-write: the clone's own page
    assert os.pread(template_fd, 8, 0) == b"TEMPLATE"


def test_the_expected_uid_gets_the_memory_but_can_only_map_it_privately(
    broker: MemoryBroker, template_fd: int
) -> None:
    broker.expect(VM_UID, Grant(template_fd, shared=False))
    probe = run_as(VM_UID, broker.socket_path)
    assert probe.returncode == 0, probe.stderr
    seen = json.loads(probe.stdout)
    assert seen["shared"] is False
    assert seen["tries"] == {"write": "EPERM", "truncate": "EPERM", "shared_map": "EPERM"}
    assert (seen["private"], seen["file"]) == ("MINELATE", "TEMPLATE")
    assert os.pread(template_fd, 8, 0) == b"TEMPLATE"


def test_a_uid_not_expected_gets_nothing_and_a_grant_is_used_once(
    broker: MemoryBroker, template_fd: int
) -> None:
    broker.expect(VM_UID, Grant(template_fd, shared=False))
    stranger = run_as(OTHER_UID, broker.socket_path)
    assert stranger.returncode != 0
    assert "no memory is expected for this uid" in stranger.stderr
    assert run_as(VM_UID, broker.socket_path).returncode == 0
    again = run_as(VM_UID, broker.socket_path)
    assert again.returncode != 0 and "no memory is expected" in again.stderr


def test_a_writable_memfd_cannot_be_sealed_while_mapped_shared() -> None:
    """The template's QEMU maps its memory shared: sealing must wait until it is gone."""
    fd = template_memory.writable_memfd("building", 4096)
    try:
        shared = mmap.mmap(fd, 4096, mmap.MAP_SHARED)
        with pytest.raises(OSError):
            template_memory.seal_read_only(fd)
        shared.close()
        template_memory.seal_read_only(fd)
        assert template_memory.is_sealed_read_only(fd)
    finally:
        os.close(fd)


LIBVIRT_ARGV = [
    "-machine",
    "pc-i440fx-7.2,usb=off,dump-guest-core=off,memory-backend=pc.ram",
    "-m",
    "512",
    "-object",
    '{"qom-type":"memory-backend-ram","id":"pc.ram","size":536870912}',
    "-overcommit",
    "mem-lock=off",
]


def test_the_wrapper_points_the_ram_backend_at_the_fd() -> None:
    argv = qemu_wrapper.rewrite_argv(LIBVIRT_ARGV, 7, shared=False, incoming=True)
    backend = json.loads(argv[5])
    assert backend == {
        "qom-type": "memory-backend-file",
        "id": "pc.ram",
        "size": 536870912,
        "mem-path": "/proc/self/fd/7",
        "share": False,
    }
    assert argv[:5] == LIBVIRT_ARGV[:5] and argv[6:] == [*LIBVIRT_ARGV[6:], "-incoming", "defer"]
    template = qemu_wrapper.rewrite_argv(LIBVIRT_ARGV, 7, shared=True, incoming=False)
    assert json.loads(template[5])["share"] is True and "-incoming" not in template
    with pytest.raises(ValueError, match="pc.ram"):
        qemu_wrapper.rewrite_argv(["-m", "512"], 7, shared=False, incoming=False)


def test_copies_keep_the_holes_of_untouched_memory(tmp_path: Path) -> None:
    """A guest's untouched memory is holes: the sealed copy holds only the data pages (shared
    memory costs what the template touched, not its size), and so does a file written back."""
    memory = tmp_path / "memory.ram"
    with open(memory, "wb") as f:
        f.write(b"head" * 1024)
        f.seek(8 << 20)
        f.write(b"tail" * 1024)
        f.truncate(64 << 20)
    fd = template_memory.sealed_copy(memory, "sparse")
    try:
        assert os.fstat(fd).st_size == 64 << 20
        assert os.fstat(fd).st_blocks * 512 <= 64 << 10
        assert os.pread(fd, 4, 0) == b"head" and os.pread(fd, 4, 8 << 20) == b"tail"
        back = os.open(tmp_path / "back.ram", os.O_WRONLY | os.O_CREAT, 0o600)
        template_memory.copy_sparse(fd, back, os.fstat(fd).st_size)
        os.close(back)
        assert (tmp_path / "back.ram").read_bytes() == memory.read_bytes()
        assert (tmp_path / "back.ram").stat().st_blocks * 512 <= 64 << 10
    finally:
        os.close(fd)


def test_a_second_broker_on_the_same_socket_is_refused(broker: MemoryBroker) -> None:
    """Another process of the same host (an overlapping restart) cannot take the socket over:
    the flock is per open file, so a second broker in this process meets it too."""
    with pytest.raises(template_memory.BrokerTaken):
        MemoryBroker(broker.socket_path).start()
    assert broker.serving() and broker.socket_path.exists()
