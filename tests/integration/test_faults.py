"""Faults survived, on real processes: each test breaks one part of a running instance (kill -9
the host worker, a guest's QEMU or the API; restart libvirtd or Redis; fill the VM directory)
and proves the same four things afterwards: no execution stays `queued` or `running` past its
timeout plus a grace, no VM or VM file is leaked, the client was told what happened, and the
host serves new sessions.

These tests break things, so they run on an instance of their own (`faults`), started like the
shared `stack` but with its VM directory on a small loop-mounted file system that the last test
fills (never the machine's root file system)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from shoal import executions, keys, redis_conn
from shoal.ops import daemons, processes
from shoal.settings import Settings, load
from tests.integration.conftest import REPO, Stack, domain_names, start_stack, stop_stack
from workers import domain as dom

VM_FS_MIB = 1200  # the template (~260 MB), a clone's save image while it restores, overlays
GRACE_S = 20  # past an execution's timeout, what recovery may take (heartbeat TTL 10 s, beat)
FILLER = "filler.bin"


def wait_until(check, timeout_s: float, interval_s: float = 0.25, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout_s} s")
        time.sleep(interval_s)


def libvirtd_ns(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run argv in libvirtd's mount namespace (shoal/ops/daemons.py starts it in a private one,
    so a file system mounted after it started is invisible to it and to the QEMUs it starts)."""
    pid = subprocess.run(["pgrep", "-x", "libvirtd"], capture_output=True, text=True).stdout
    return subprocess.run(
        ["nsenter", "-t", pid.split()[0], "-m", *argv], capture_output=True, text=True, check=check
    )


@contextlib.contextmanager
def loop_fs(size_mib: int) -> Iterator[Path]:
    """A fresh ext4 file system of `size_mib`, loop-mounted under /var/lib (QEMU, running as
    another user, must traverse the path) here and in libvirtd's namespace; unmounted and
    removed afterwards."""
    daemons.ensure_virtlogd()
    daemons.ensure_libvirtd()
    backing = Path(tempfile.mkstemp(prefix="shoal-faults-", suffix=".img", dir="/var/tmp")[1])
    mount = Path(tempfile.mkdtemp(prefix="shoal-f-", dir="/var/lib"))
    try:
        os.truncate(backing, size_mib << 20)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(backing)], check=True)
        subprocess.run(["mount", "-o", "loop", str(backing), str(mount)], check=True)
        mount.chmod(0o755)
        device = subprocess.run(
            ["findmnt", "-n", "-o", "SOURCE", str(mount)], capture_output=True, text=True
        ).stdout.strip()
        try:
            libvirtd_ns("mount", device, str(mount))
            yield mount
        finally:
            # libvirtd may have been restarted (a new namespace, copied from ours): either way
            # the file system goes from its namespace and from ours.
            libvirtd_ns("umount", str(mount), check=False)
            subprocess.run(["umount", str(mount)], check=True)
    finally:
        mount.rmdir()
        backing.unlink()


@pytest.fixture(scope="module")
def faults(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with loop_fs(VM_FS_MIB) as vm_dir:
        overrides = {
            "SHOAL_VM_DIR": str(vm_dir),
            "SHOAL_POOLS_FILE": str(REPO / "tests" / "integration" / "pools_faults.toml"),
            "SHOAL_API_WORKERS": "1",
            "SHOAL_TLS_PORT": "0",
            # Redis stays down ~4 s in test_redis_restarted: the host must not lapse meanwhile.
            "SHOAL_HEARTBEAT_TTL_S": "10",
        }
        stack = start_stack(tmp_path_factory.mktemp("shoal-faults"), overrides)
        try:
            yield stack
        finally:
            (vm_dir / FILLER).unlink(missing_ok=True)
            stop_stack(stack)


# --- what every fault must leave behind ---------------------------------------------------------
def get(stack: Stack, path: str, **kwargs) -> requests.Response:
    return requests.get(f"{stack.url}{path}", headers=stack.headers(), timeout=10, **kwargs)


def status_of(stack: Stack, execution_id: str) -> dict:
    response = get(stack, f"/v1/executions/{execution_id}")
    assert response.status_code == 200, response.text
    return response.json()


def start(stack: Stack, session_id: str, code: str, timeout_s: int = 30, **headers) -> dict:
    response = requests.post(
        f"{stack.url}/v1/sessions/{session_id}/executions",
        json={"code": code, "wait": False, "timeout_s": timeout_s},
        headers={**stack.headers(), **headers},
        timeout=30,
    )
    assert response.status_code == 202, response.text
    return {**response.json(), "timeout_s": timeout_s}


def wait_running(stack: Stack, execution_id: str) -> None:
    wait_until(lambda: status_of(stack, execution_id)["status"] == "running", 30, what="running")


def wait_final(stack: Stack, execution: dict) -> dict:
    """The execution's final record, within its timeout plus GRACE_S of now."""
    deadline_s = execution["timeout_s"] + GRACE_S
    return wait_until(
        lambda: (lambda r: r if r["status"] in executions.FINAL else None)(
            status_of(stack, execution["id"])
        ),
        deadline_s,
        what=f"execution {execution['id']} final",
    )


def domains(settings: Settings) -> set[str]:
    """Keys of this instance's VM domains on libvirt (template builds excluded)."""
    names = domain_names()
    found = {dom.key_of(settings, name) for name in names}
    return {key for key in found if key is not None and not dom.is_template_key(key)}


def vm_dirs(settings: Settings) -> set[str]:
    vms = settings.instance_vm_dir / "vms"
    return {p.name for p in vms.iterdir()} if vms.is_dir() else set()


def delete_sessions(stack: Stack) -> None:
    listing = get(stack, "/v1/sessions").json()
    for session in listing.get("sessions", listing if isinstance(listing, list) else []):
        requests.delete(
            f"{stack.url}/v1/sessions/{session['id']}", headers=stack.headers(), timeout=60
        )


def assert_recovered(stack: Stack) -> None:
    """The host serves a new session; once the test's sessions are gone, the instance runs
    its one ready VM and nothing else: no leaked domain, no leaked VM directory."""
    wait_until(
        lambda: requests.get(f"{stack.url}/healthz", timeout=10).status_code == 200,
        90,
        what="healthy",
    )
    fresh = stack.new_session()
    assert stack.execute(fresh, "6 * 7")["result"]["text/plain"] == "42"
    delete_sessions(stack)
    settings = load(stack.env)

    def clean() -> bool:
        running, dirs = domains(settings), vm_dirs(settings)
        return len(running) <= 1 and dirs == running

    wait_until(clean, 60, what=f"no leak: {domains(settings)} vs {vm_dirs(settings)}")


def waiting_client(stack: Stack, session_id: str, code: str, **headers) -> dict:
    """POST an execution with wait=true in a thread; its outcome lands in the returned dict."""
    outcome: dict = {}

    def run() -> None:
        try:
            response = requests.post(
                f"{stack.url}/v1/sessions/{session_id}/executions",
                json={"code": code, "wait": True, "timeout_s": 30},
                headers={**stack.headers(), **headers},
                timeout=120,
            )
            outcome["status"], outcome["body"] = response.status_code, response.json()
        except requests.RequestException as exc:
            outcome["exception"] = exc

    outcome["thread"] = threading.Thread(target=run, daemon=True)
    outcome["thread"].start()
    return outcome


# --- the faults ---------------------------------------------------------------------------------
def test_worker_killed_mid_execution(faults: Stack) -> None:
    """kill -9 the host worker while an execution runs and a client waits on another: both end
    `lost` saying the host stopped answering, and `shoal up` brings the worker back."""
    settings = load(faults.env)
    session_id = faults.new_session()
    running = start(faults, session_id, "import time; time.sleep(20)")
    wait_running(faults, running["id"])
    waiter = waiting_client(faults, session_id, "print('never')")
    time.sleep(0.5)

    os.killpg(processes.running_pid(settings, "worker"), signal.SIGKILL)
    lost = wait_final(faults, running)
    assert lost["status"] == "lost", lost
    assert "host testhost stopped answering" in lost["stderr"], lost["stderr"]
    waiter["thread"].join(60)
    assert waiter.get("status") == 200, waiter
    assert waiter["body"]["status"] == "lost", waiter["body"]
    assert "host testhost stopped answering" in waiter["body"]["stderr"], waiter["body"]
    refused = requests.post(
        f"{faults.url}/v1/sessions/{session_id}/executions",
        json={"code": "1"},
        headers=faults.headers(),
        timeout=10,
    )
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "SessionLost"

    faults.shoal("up", "--detach")
    assert_recovered(faults)


def test_qemu_killed_mid_execution(faults: Stack) -> None:
    """kill -9 a guest's QEMU while its execution runs: the execution and the session end
    `lost` saying the VM died; the session refuses more work with SessionLost."""
    session_id = faults.new_session()
    running = start(faults, session_id, "import time; time.sleep(20)")
    wait_running(faults, running["id"])
    settings = load(faults.env)
    vm_id = redis_conn.client(settings).hget(keys.session(session_id), "vm") or session_id
    name = dom.domain_name(settings, dom.vm_key(vm_id))
    qemu = [pid for pid in qemu_processes() if f"guest={name}," in cmdline(pid)]
    assert len(qemu) == 1, qemu
    os.kill(qemu[0], signal.SIGKILL)

    lost = wait_final(faults, running)
    assert lost["status"] == "lost" and "lost" in lost["stderr"], lost
    refused = requests.post(
        f"{faults.url}/v1/sessions/{session_id}/executions",
        json={"code": "1"},
        headers=faults.headers(),
        timeout=10,
    )
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"]["code"] == "SessionLost"
    assert_recovered(faults)


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def qemu_processes() -> list[int]:
    return [
        int(p.name)
        for p in Path("/proc").iterdir()
        if p.name.isdigit() and "qemu-system" in cmdline(int(p.name))
    ]


def test_libvirtd_restarted(faults: Stack) -> None:
    """`shoal daemons --restart-libvirtd` while an execution runs: running guests survive it,
    the execution completes, the session keeps its state and new sessions start."""
    session_id = faults.new_session()
    faults.execute(session_id, "x = 41")
    running = start(faults, session_id, "import time; time.sleep(3); x += 1; x")
    wait_running(faults, running["id"])
    restarted = faults.shoal("daemons", "--restart-libvirtd")
    assert "restarted" in restarted.stdout, restarted.stdout + restarted.stderr

    done = wait_final(faults, running)
    assert done["status"] == "succeeded", done
    assert done["result"]["text/plain"] == "42"
    assert faults.execute(session_id, "x")["result"]["text/plain"] == "42"
    assert_recovered(faults)


def test_redis_restarted(faults: Stack) -> None:
    """kill -9 the private Redis while an execution runs, and keep it down past the execution's
    end: a client asking meanwhile is told the store is unavailable (503), not a 500; `shoal up`
    brings Redis back on its port with its append-only file; the worker stores the end it held,
    the client that waited all along gets its result, and the session keeps its state."""
    settings = load(faults.env)
    session_id = faults.new_session()
    faults.execute(session_id, "y = 1")
    waiter = waiting_client(faults, session_id, "import time; time.sleep(1.5); y += 1; y")
    wait_until(lambda: status_of_session(faults, session_id) == "running", 30, what="running")

    worker_log = processes.log_file(settings, "worker")
    retried = "Redis unavailable storing its end"
    retries_before = worker_log.read_text().count(retried)
    os.killpg(processes.running_pid(settings, "redis"), signal.SIGKILL)
    during = get(faults, f"/v1/sessions/{session_id}")
    assert during.status_code == 503, during.text
    assert during.json()["error"]["code"] == "StoreUnavailable", during.text
    assert "Redis" in during.json()["error"]["message"]
    assert during.headers["Retry-After"] == "2"
    # Redis stays down until the execution has ended and the worker has tried to store its end
    # (a fixed pause was not enough on a loaded host: the cell can start late under TCG).
    wait_until(
        lambda: worker_log.read_text().count(retried) > retries_before,
        40,
        what="the worker retrying to store the execution's end",
    )
    faults.shoal("up", "--detach")

    waiter["thread"].join(60)
    assert waiter.get("status") == 200, waiter
    assert waiter["body"]["status"] == "succeeded", waiter["body"]
    assert waiter["body"]["result"]["text/plain"] == "2"
    assert faults.execute(session_id, "y")["result"]["text/plain"] == "2"
    assert_recovered(faults)


def status_of_session(stack: Stack, session_id: str) -> str:
    """The status of the session's latest execution, read from the registry."""
    r = redis_conn.client(load(stack.env))
    latest = r.zrange(keys.session_executions(session_id), -1, -1)
    return status_of(stack, latest[0])["status"] if latest else ""


def test_api_killed_while_client_waits(faults: Stack) -> None:
    """kill -9 the API while a client waits on a synchronous execution; once the API is back the
    client retries with its Idempotency-Key and gets the same execution, run once."""
    settings = load(faults.env)
    session_id = faults.new_session()
    code = (
        "import time\n"
        "with open('/mnt/data/ran.txt', 'a') as f: f.write('x')\n"
        "time.sleep(3)\n"
        "open('/mnt/data/ran.txt').read()"
    )
    key = {"Idempotency-Key": "fault-api-killed-1"}
    first = waiting_client(faults, session_id, code, **key)
    time.sleep(1.5)
    os.killpg(processes.running_pid(settings, "api"), signal.SIGKILL)
    first["thread"].join(30)
    assert "exception" in first, first  # the connection died with the API

    faults.shoal("up", "--detach")
    retried = waiting_client(faults, session_id, code, **key)
    retried["thread"].join(90)
    assert retried.get("status") == 200, retried
    record = retried["body"]
    assert record["status"] == "succeeded", record
    assert record["result"]["text/plain"] == "'x'", record  # the code ran once
    again = waiting_client(faults, session_id, code, **key)
    again["thread"].join(30)
    assert again["body"]["id"] == record["id"]
    assert (
        faults.execute(session_id, "open('/mnt/data/ran.txt').read()")["result"]["text/plain"]
        == "'x'"
    )
    assert_recovered(faults)


def test_vm_directory_full(faults: Stack) -> None:
    """Fill the file system of the VM directory: a new session is refused with HostStorageFull
    (503, nothing started, the template kept); a guest whose disk write finds no room pauses
    (QEMU loses nothing) and its execution ends `lost` saying the host's disk is full, within its
    timeout plus a grace; once space is freed the host serves new sessions, nothing leaked."""
    settings = load(faults.env)
    session_id = faults.new_session()
    faults.execute(session_id, "z = 1")
    filler = Path(settings.vm_dir) / FILLER
    fill(filler)
    try:
        created = [
            requests.post(
                f"{faults.url}/v1/sessions", json={}, headers=faults.headers(), timeout=120
            )
            for _ in range(2)  # the first may take the ready VM made before the disk filled
        ]
        refused = created[-1]
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "HostStorageFull", refused.text
        assert "no disk space" in refused.json()["error"]["message"]
        assert refused.headers["Retry-After"]

        write = "import os\nwith open('/mnt/data/more.bin', 'wb') as f:\n"
        write += "    f.write(os.urandom(8 << 20)); f.flush(); os.fsync(f.fileno())"
        written = start(faults, session_id, write, timeout_s=5)
        final = wait_final(faults, written)
        assert final["status"] == "lost", final
        assert "the host's disk is full" in final["stderr"], final
        upload = requests.put(
            f"{faults.url}/v1/sessions/{session_id}/files/late.bin",
            data=b"late",
            headers=faults.headers(),
            timeout=30,
        )
        assert upload.status_code == 409, upload.text
        assert upload.json()["error"]["code"] == "SessionLost"
        assert "disk is full" in upload.json()["error"]["message"]
    finally:
        filler.unlink()
    assert_recovered(faults)


def fill(path: Path) -> None:
    """Take every free block of the file system that holds `path` (root's reserve too)."""
    stats = os.statvfs(path.parent)
    size = stats.f_bfree * stats.f_frsize
    subprocess.run(["fallocate", "-l", str(size), str(path)], check=False)
    with open(path, "ab") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * (1 << 20))
            f.flush()
            os.fsync(f.fileno())
    assert shutil.disk_usage(path.parent).free < (1 << 20)
