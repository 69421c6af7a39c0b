"""Shoal guest agent (entry point: agent.py): answers the host over one byte stream.

The protocol is in docs/agent-protocol.md.

In the guest it runs as PID 1 (root) with no arguments: it finds the virtio-serial port named
protocol.CHANNEL_NAME, serves requests on it, supervises an interpreter process (kernel.py,
shoal_kernel.py) that runs user code as the sandbox user in /mnt/data, runs shell commands, and
moves files in and out of /mnt/data.

One thread, one poll() loop: the host channel, the kernel's control socket and output pipes, a
running shell command's pipes and the signal wakeup pipe (SIGCHLD, SIGIO) are all watched at once,
so an interrupt is read while an execution runs and an idle agent sleeps in poll() with no timeout.

This module is the Agent's state, its loop and the dispatch of requests to their handlers (and
the small requests: hello, ping, interrupt). The rest of the Agent is inherited, one job a module:
    channel.py         the host channel, its frames, sending answers (HostLink)
    executions.py      execute: deadline, interrupt, the one answer (Executions)
    kernel_process.py  the interpreter process and its supervision (Kernel, KernelSupervision)
    shell.py           shell executions (ShellExecutions)
    file_requests.py   the file requests and transfers (FileRequests); files.py does the I/O
    snapshot.py        prepare_snapshot, and reseed after a restore (Snapshots)

For tests on the host:  agent.py --fd N --data-dir DIR --user none
(N: one end of a socketpair the caller passed down; the agent exits when it reaches EOF).
Standard library only.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import pwd
import select
import signal
import subprocess
import sys
import time
from typing import Any

if not os.path.isdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), "shoal")):
    # A source checkout, vm-images/agent/ (the image has shoal/protocol.py next to the agent):
    # the repository's own shoal.protocol, even when another one is installed.
    sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import confine
import files
from channel import (
    BadRequest,
    Channel,
    FdChannel,
    FrameReader,
    HostLink,
    ListenChannel,
    Outbox,
    VirtioChannel,
    read_available,
    wait_for_port,
)
from executions import Execution, Executions
from file_requests import FileRequests, GetTransfer, PutTransfer
from kernel_process import Kernel, KernelSupervision, describe_death
from shell import ShellExecutions
from snapshot import IDENTITY_FILE, Snapshots
from transfer_disk import TransferDisk, open_if_any
from transfer_disk import find as find_transfer_disk

from shoal import protocol

AGENT_VERSION = "0.1.0"
HERE = os.path.dirname(os.path.abspath(__file__))
log = logging.getLogger("shoal.agent")

INHERITED_ENV = ("MPLCONFIGDIR", "IPYTHONDIR", "OPENBLAS_CORETYPE", "TZ")
DATA_DISK_ERROR_FILE = "/run/shoal/data-disk-error"  # written by the guest's init
ALWAYS_ANSWERED = frozenset({protocol.OP_HELLO, protocol.OP_PING, protocol.OP_INTERRUPT})


class Agent(HostLink, Executions, KernelSupervision, ShellExecutions, FileRequests, Snapshots):
    """The agent: its state (all of it set up here, used by the parts it inherits), the loop,
    and the dispatch of requests to their handlers."""

    def __init__(
        self,
        channel: Channel,
        data_dir: str,
        user: str | None,
        python: str,
        state_dir: str,
        system: bool,
        interrupt_grace: float = protocol.INTERRUPT_GRACE_S,
        transfer_disk: TransferDisk | None = None,
    ):
        self.channel = channel
        channel.agent = self
        self.python = python
        self.system = system
        # Where `reseed` records the identity the host gave this VM (readable by user code).
        self.identity_file = IDENTITY_FILE if system else os.path.join(state_dir, "identity")
        self.interrupt_grace = interrupt_grace
        self.started = time.monotonic()
        self.stopping = False
        self.reader = FrameReader()
        self.outbox = Outbox()
        self.kernel: Kernel | None = None
        self.generation = 0
        self.kernel_restarts = 0
        self.start_failures = 0
        self.kernel_start_at: float | None = None
        self.execution: Execution | None = None
        self.transfer: GetTransfer | PutTransfer | None = None
        self.transfer_disk = transfer_disk  # uploads' bytes come by it, when there is one
        self.exec_seq = 0
        self.state_lost = False  # a used kernel died between executions: tell the next one
        self._packages: dict[str, str] | None = None
        self.sigchld = False
        self.poller = select.poll()
        self.polled: dict[int, int] = {}

        uid = gid = None
        self.drop_privileges: dict[str, Any] = {}
        home = os.path.realpath(data_dir)
        self.user_name = user or pwd.getpwuid(os.getuid()).pw_name
        if user is not None:
            pw = pwd.getpwnam(user)
            uid, gid = pw.pw_uid, pw.pw_gid
            self.drop_privileges = {"user": uid, "group": gid, "extra_groups": []}
            os.setgroups([])
        self.user_uid, self.user_gid = uid, gid
        # In the guest: the session's cgroup, its memory and pids limits (confine.py).
        self.cgroup = confine.setup() if system else None
        # Read back from the live system once, before any user code ran: nothing unprivileged
        # can change it, and a restored clone answers its first hello without re-reading /proc
        # (~30 ms of first-run code under TCG, on the path of every on-demand session).
        self.confinement = confine.report(self.cgroup) if system else None
        self.data_dir = files.DataDir(data_dir, uid, gid)
        for sub in ("mpl", "ipython", "cache"):
            path = os.path.join(state_dir, sub)
            os.makedirs(path, exist_ok=True)
            if uid is not None:
                os.chown(state_dir, uid, gid)
                os.chown(path, uid, gid)
        self.user_env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": home,
            "USER": self.user_name,
            "LOGNAME": self.user_name,
            "SHELL": "/bin/bash",
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "TERM": "dumb",
            "PYTHONIOENCODING": "utf-8",
            "PYTHONDONTWRITEBYTECODE": "1",
            "MPLBACKEND": "module://shoal_mpl_backend",
            "MPLCONFIGDIR": os.path.join(state_dir, "mpl"),
            "IPYTHONDIR": os.path.join(state_dir, "ipython"),
            "TMPDIR": "/tmp",
            "XDG_CACHE_HOME": os.path.join(state_dir, "cache"),
        }
        # Set up for us by the guest's init: the prepared matplotlib font cache, OpenBLAS's CPU.
        for name in INHERITED_ENV:
            if os.environ.get(name):
                self.user_env[name] = os.environ[name]
        if os.path.dirname(python) not in ("/usr/bin", "/bin", "/usr/local/bin"):
            self.user_env["PATH"] = os.path.dirname(python) + ":" + self.user_env["PATH"]

        # Signals arrive as bytes on a pipe so they wake poll(); the handlers do nothing else.
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        for sig in (signal.SIGCHLD, signal.SIGIO):
            signal.signal(sig, lambda s, f: None)
        if os.getpid() != 1:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, self._stop_signal)

    def user_process(self, leaf: str) -> dict[str, Any]:
        """Popen arguments that start a process as the sandbox user, in the session's cgroup
        leaf `leaf` when there is one (the guest)."""
        if self.cgroup is None:
            return self.drop_privileges
        return {"preexec_fn": self.cgroup.enter(leaf, self.user_uid, self.user_gid)}

    def _stop_signal(self, signum, frame) -> None:
        self.stopping = True

    # --- the loop -------------------------------------------------------------------------
    def run(self) -> None:
        self.start_kernel()
        self.channel.start()
        while not self.stopping:
            self._sync_poll()
            timeout = self._next_timeout()
            events = self.poller.poll(None if timeout is None else max(0, int(timeout * 1000) + 1))
            for fd, ev in events:
                self._dispatch(fd, ev)
            if self.sigchld:
                self.sigchld = False
                self._reap()
            self._timers()
            self.channel.recheck()
            self._pump()
        self.shutdown()

    def shutdown(self) -> None:
        if self.kernel is not None:
            self.kernel.kill("agent exiting")
        ex = self.execution
        if ex is not None and ex.proc is not None:
            self._kill_shell(ex)
        if self.transfer is not None:
            self.transfer.close()

    def _desired(self) -> dict[int, int]:
        want: dict[int, int] = {self.wake_r: select.POLLIN}
        ch = self.channel
        for fd, ev in ch.watch():
            want[fd] = ev
        if ch.fd is not None:
            want[ch.fd] = select.POLLIN | (select.POLLOUT if self.outbox.size else 0)
        k = self.kernel
        if k is not None:
            if k.ctrl_fd is not None:
                want[k.ctrl_fd] = select.POLLIN | (select.POLLOUT if k.outbox.size else 0)
            for fd in (k.stdout_fd, k.stderr_fd):
                if fd is not None:
                    want[fd] = select.POLLIN
        ex = self.execution
        if ex is not None:
            for fd in ex.pipes:
                want[fd] = select.POLLIN
        return want

    def _sync_poll(self) -> None:
        want = self._desired()
        polled = self.polled
        if want == polled:
            return
        for fd in list(polled):
            if fd not in want:
                self.poller.unregister(fd)
                del polled[fd]
        for fd, ev in want.items():
            if polled.get(fd) != ev:
                self.poller.register(fd, ev)
                polled[fd] = ev

    def _next_timeout(self) -> float | None:
        now = time.monotonic()
        times = []
        ex = self.execution
        if ex is not None:
            if ex.interrupt_reason is None:
                times.append(ex.deadline)
            for t in (ex.kill_at, ex.abandon_at):
                if t is not None:
                    times.append(t)
        if self.kernel_start_at is not None:
            times.append(self.kernel_start_at)
        if self.kernel is not None and self.kernel.kill_at is not None:
            times.append(self.kernel.kill_at)
        wait = min(times) - now if times else None
        recheck = self.channel.recheck_after()
        if recheck is not None:
            wait = recheck if wait is None else min(wait, recheck)
        return wait

    def _dispatch(self, fd: int, ev: int) -> None:
        if fd == self.wake_r:
            try:
                data = os.read(self.wake_r, 512)
            except BlockingIOError:
                return
            if signal.SIGCHLD in data:
                self.sigchld = True
            return
        ch = self.channel
        if fd == ch.fd:
            self._channel_event(ev)
            return
        if any(fd == w for w, _ in ch.watch()):
            ch.on_event(fd)
            return
        k = self.kernel
        if k is not None:
            if fd == k.ctrl_fd:
                self._kernel_ctrl_event(k, ev)
                return
            if fd == k.stdout_fd or fd == k.stderr_fd:
                attr = "stdout_fd" if fd == k.stdout_fd else "stderr_fd"
                if not read_available(fd, lambda data: self._kernel_output(k, attr, data)):
                    os.close(fd)
                    setattr(k, attr, None)
                return
        ex = self.execution
        if ex is not None and fd in ex.pipes and not read_available(fd, ex.pipes[fd].feed):
            os.close(fd)
            del ex.pipes[fd]

    # --- requests -------------------------------------------------------------------------
    def _handle(self, message: dict, blob: bytes) -> None:
        rid = message.get("id")
        if not isinstance(rid, int) or isinstance(rid, bool):
            echo = rid if isinstance(rid, str) else None
            self.error(echo, protocol.E_INVALID, "id must be an integer")
            return
        op = message.get("op")
        if op == protocol.OP_CHUNK:
            self._chunk(rid, message, blob)
            return
        handler = self.HANDLERS.get(op) if isinstance(op, str) else None
        if handler is None:
            self.error(rid, protocol.E_UNKNOWN_OP, f"unknown op {op!r}")
            return
        if op not in ALWAYS_ANSWERED and (self.execution is not None or self.transfer is not None):
            what = "an execution" if self.execution is not None else "a file transfer"
            self.error(rid, protocol.E_BUSY, f"{what} is in progress")
            return
        try:
            handler(self, rid, message)
        except BadRequest as exc:
            self.error(rid, protocol.E_INVALID, str(exc))
        except files.FileOpError as exc:
            self.error(rid, exc.code, exc.message)
        except Exception as exc:
            log.exception("request %s (%s) failed", rid, op)
            self.error(rid, protocol.E_INTERNAL, f"{type(exc).__name__}: {exc}")

    def op_hello(self, rid: int, message: dict) -> None:
        k = self.kernel
        fields: dict[str, Any] = {
            "agent_version": AGENT_VERSION,
            "protocol_version": protocol.PROTOCOL_VERSION,
            "python_version": (k.python_version if k is not None else "")
            or ".".join(map(str, sys.version_info[:3])),
            "kernel": self._kernel_state(),
            "kernel_pid": k.pid if k is not None else None,
            "kernel_restarts": self.kernel_restarts,
            "busy": self.execution is not None or self.transfer is not None,
            "user": self.user_name,
            "data_dir": protocol.DATA_DIR,
            "data_disk_error": self._data_disk_error(),
            "transfer_disk": self.transfer_disk is not None,
            "uptime_s": round(time.monotonic() - self.started, 3),
        }
        if self.confinement is not None:
            fields["confinement"] = self.confinement
        if message.get("packages", True):
            fields["packages"] = self.packages()
        self.answer(rid, **fields)

    @staticmethod
    def _data_disk_error() -> str | None:
        """What init said about the data disk when it could not mount it, or None."""
        try:
            with open(DATA_DISK_ERROR_FILE, errors="replace") as f:
                return f.read(4096).strip() or None
        except OSError:
            return None

    def packages(self) -> dict[str, str]:
        """name -> version of the kernel's interpreter; computed on first use, then cached."""
        if self._packages is None:
            if os.path.realpath(self.python) == os.path.realpath(sys.executable):
                found = list_packages()
            else:  # a different interpreter (host tests): ask it, once
                out = subprocess.run(
                    [self.python, "-c", "import supervisor; supervisor.print_packages()"],
                    cwd=HERE,
                    capture_output=True,
                    timeout=60,
                    env={"PYTHONPATH": HERE, "PATH": self.user_env["PATH"]},
                )
                found = json.loads(out.stdout or b"{}")
            self._packages = found
        return self._packages

    def _kernel_state(self) -> str:
        k = self.kernel
        if k is None:
            return "down"
        return "ready" if k.ready else "starting"

    def op_ping(self, rid: int, message: dict) -> None:
        self.answer(
            rid,
            busy=self.execution is not None or self.transfer is not None,
            kernel=self._kernel_state(),
        )

    def op_interrupt(self, rid: int, message: dict) -> None:
        ex = self.execution
        t = self.transfer
        if ex is not None:
            self._interrupt(ex, protocol.STATUS_INTERRUPTED)
            self.answer(rid, interrupted=True)
        elif isinstance(t, GetTransfer | PutTransfer):
            t.close()  # an upload's temporary file is removed: nothing half-written remains
            self.transfer = None
            op = "file_get" if isinstance(t, GetTransfer) else "file_put"
            self.error(t.id, protocol.E_CANCELLED, f"{op} cancelled by an interrupt")
            self.answer(rid, interrupted=True)
        else:
            self.answer(rid, interrupted=False)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            k = self.kernel
            ex = self.execution
            if k is not None and pid == k.pid:
                k.proc.returncode = code
                self._kernel_gone(k, describe_death(self, k, code))
            elif ex is not None and ex.proc is not None and pid == ex.proc.pid:
                ex.proc.returncode = code
                self._shell_exited(ex, code)

    HANDLERS = {
        protocol.OP_HELLO: op_hello,
        protocol.OP_PING: op_ping,
        protocol.OP_PREPARE_SNAPSHOT: Snapshots.op_prepare_snapshot,
        protocol.OP_INTERRUPT: op_interrupt,
        protocol.OP_RESEED: Snapshots.op_reseed,
        protocol.OP_EXECUTE: Executions.op_execute,
        protocol.OP_FILE_PUT: FileRequests.op_file_put,
        protocol.OP_FILE_GET: FileRequests.op_file_get,
        protocol.OP_FILE_LIST: FileRequests.op_file_list,
        protocol.OP_FILE_STAT: FileRequests.op_file_stat,
        protocol.OP_FILE_DELETE: FileRequests.op_file_delete,
    }


def list_packages() -> dict[str, str]:
    found: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if isinstance(name, str) and name not in found:
            found[name] = str(dist.version)
    return dict(sorted(found.items(), key=lambda kv: kv[0].lower()))


def print_packages() -> None:
    print(json.dumps(list_packages()))


# --- entry point -----------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = p.add_mutually_exclusive_group()
    where.add_argument("--fd", type=int, help="serve an inherited connected socket (tests)")
    where.add_argument("--socket", help="listen on this unix socket path, one host at a time")
    where.add_argument("--port", help="virtio-serial device (default: found by channel name)")
    p.add_argument("--data-dir", default=protocol.DATA_DIR)
    p.add_argument("--user", default="sandbox", help="run user code as NAME; 'none' keeps ours")
    p.add_argument("--python", default=sys.executable, help="interpreter for the kernel")
    p.add_argument("--state-dir", default="/tmp/shoal", help="MPLCONFIGDIR, IPYTHONDIR live here")
    p.add_argument(
        "--system",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="let reseed set the clock and credit entropy (default: only in the guest)",
    )
    p.add_argument("--interrupt-grace", type=float, default=protocol.INTERRUPT_GRACE_S)
    p.add_argument(
        "--transfer-disk",
        help="uploads' bytes come from this file or device (default: in the guest, the disk "
        f"whose serial is {protocol.TRANSFER_DISK_SERIAL!r}, if any)",
    )
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="shoal-agent %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    os.umask(0o022)
    guest = args.fd is None and args.socket is None
    system = guest if args.system is None else args.system
    if args.fd is not None:
        channel: Channel = FdChannel(args.fd)
    elif args.socket is not None:
        channel = ListenChannel(args.socket)
    else:
        channel = None  # the virtio port, opened below
    user = None if args.user == "none" else args.user
    try:
        agent = Agent(
            channel or VirtioChannel(args.port or wait_for_port()),
            args.data_dir,
            user,
            os.path.abspath(args.python),  # the kernel starts in the data dir
            os.path.abspath(args.state_dir),
            system,
            args.interrupt_grace,
            open_if_any(args.transfer_disk or (find_transfer_disk() if guest else None)),
        )
        agent.run()
    except Exception:
        if not guest:
            raise
        # PID 1 must not exit (the guest kernel would panic): start over from a clean exec.
        log.exception("agent failed; re-executing")
        time.sleep(1)
        os.execv(sys.executable, [sys.executable, *sys.argv])
