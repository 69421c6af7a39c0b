"""The interpreter process ("kernel"), seen from the agent: starting, messaging, interrupting and
killing it, and the Agent's supervision of it (ready, done, died, restart).

The kernel (kernel.py -> shoal_kernel.py) runs user code as the sandbox user, so everything it
says is untrusted: its messages are bounded and shape-checked, and a kernel that breaks the
framing (shoal_kernel_framing.py, shared with it) or will not die is killed. Kernel is one
process; KernelSupervision is the part of supervisor.Agent that keeps one running and turns its
"done" into an execution's answer. Standard library only.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import select
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import confine
from channel import Outbox, read_available, readable, set_nonblocking
from executions import is_number
from shoal_kernel_framing import encode_message, take_messages

from shoal import protocol

if TYPE_CHECKING:
    from executions import Execution
    from supervisor import Agent

HERE = os.path.dirname(os.path.abspath(__file__))
log = logging.getLogger("shoal.agent")

CTRL_EOF_KILL_S = 1.0  # a kernel that closed its control socket but lives on is killed
KERNEL_MAX_MESSAGE = protocol.MAX_JSON_FROM_GUEST - (2 << 20)  # read from the kernel
KERNEL_START_FAILURES = 3  # an execution waiting for a kernel gives up after this many
STDERR_TAIL = 4096


class Kernel:
    """One interpreter process: its pid, control socket and output pipes."""

    def __init__(self, agent: Agent, generation: int):
        self.agent = agent
        self.generation = generation
        self.ready = False
        self.started = time.monotonic()
        self.inbuf = bytearray()
        self.outbox = Outbox()
        self.killed = False
        self.used = False  # has run an execution: its death loses the user's state
        self.retiring = False  # said it is exiting (user code called exit()): send it nothing
        self.kill_at: float | None = None
        self.kill_reason = ""
        self.python_version = ""
        self.stderr_tail = bytearray()
        cgroup = agent.cgroup
        self.oom_kills_before = cgroup.oom_kills(confine.KERNEL_LEAF) if cgroup else 0
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        # Shared with the kernel: the id of the execution an interrupt is for (see shoal_kernel.py).
        shm_fd = os.memfd_create("shoal-interrupt", os.MFD_CLOEXEC)
        os.ftruncate(shm_fd, 8)
        self.shared = mmap.mmap(shm_fd, 8)
        env = dict(agent.user_env)
        env["SHOAL_KERNEL_FD"] = str(child.fileno())
        env["SHOAL_INTERRUPT_FD"] = str(shm_fd)
        try:
            self.proc = subprocess.Popen(
                [agent.python, os.path.join(HERE, "kernel.py")],
                stdin=subprocess.DEVNULL,
                stdout=out_w,
                stderr=err_w,
                pass_fds=(child.fileno(), shm_fd),
                cwd=agent.data_dir.root,
                env=env,
                process_group=0,
                **agent.user_process(confine.KERNEL_LEAF),
            )
        except BaseException:
            for fd in (out_r, err_r):
                os.close(fd)
            parent.close()
            raise
        finally:
            child.close()
            os.close(out_w)
            os.close(err_w)
            os.close(shm_fd)
        self.pid = self.proc.pid
        self.ctrl = parent
        self.ctrl.setblocking(False)
        self.ctrl_fd: int | None = parent.fileno()
        self.stdout_fd: int | None = out_r
        self.stderr_fd: int | None = err_r
        set_nonblocking(out_r)
        set_nonblocking(err_r)

    def send(self, message: dict) -> None:
        self.outbox.push(encode_message(message))
        self.flush()

    def flush(self) -> None:
        if self.ctrl_fd is None:
            return
        try:
            self.outbox.flush(self.ctrl_fd)
        except OSError:
            self.outbox.clear()
            self.kill("control socket write failed")

    def interrupt(self, seq: int) -> None:
        """KeyboardInterrupt in execution seq's cell, even if it has not quite started yet."""
        if not self.killed:
            struct.pack_into("<Q", self.shared, 0, seq)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGINT)

    def kill(self, reason: str) -> None:
        if not self.killed:
            log.warning("killing kernel %d: %s", self.pid, reason)
            self.kill_reason = reason
        self.killed = True
        self.kill_group()

    def kill_group(self) -> None:
        """SIGKILL the kernel and whatever it started: its process group, and in the guest every
        process in the kernel's cgroup leaf (however it detached: setsid, double fork)."""
        for target in (lambda: os.killpg(self.pid, signal.SIGKILL), lambda: os.kill(self.pid, 9)):
            with contextlib.suppress(OSError):
                target()
        if self.agent.cgroup is not None:
            self.agent.cgroup.kill(confine.KERNEL_LEAF)

    def close_fds(self, sink: Callable[[str, bytes], Any] | None = None) -> None:
        """Drain the output pipes into sink, then close everything (the process has exited)."""
        for attr in ("stdout_fd", "stderr_fd"):
            fd = getattr(self, attr)
            if fd is not None:
                if sink is not None:
                    read_available(fd, lambda data, a=attr: sink(a, data))
                os.close(fd)
                setattr(self, attr, None)
        if self.ctrl_fd is not None:
            self.ctrl.close()
            self.ctrl_fd = None
        if not self.shared.closed:
            self.shared.close()


class KernelSupervision:
    """Part of supervisor.Agent: starts the kernel (again, with a back-off when it fails), reads
    its control socket and output pipes, and answers an execution from its "done" or its death.
    The state is the Agent's."""

    kernel: Kernel | None
    execution: Execution | None
    generation: int
    kernel_restarts: int
    start_failures: int
    kernel_start_at: float | None
    state_lost: bool
    interrupt_grace: float

    def start_kernel(self) -> None:
        self.generation += 1
        try:
            self.kernel = Kernel(self, self.generation)
        except (OSError, subprocess.SubprocessError) as exc:
            log.error("cannot start the kernel: %s", exc)
            self.kernel = None
            self._kernel_start_failed(f"cannot start the interpreter: {exc}")
            return
        log.info("kernel %d started (generation %d)", self.kernel.pid, self.generation)

    def _kernel_start_failed(self, reason: str) -> None:
        self.start_failures += 1
        delay = min(30.0, 0.5 * 2 ** (self.start_failures - 1))
        self.kernel_start_at = time.monotonic() + delay
        ex = self.execution
        if (
            ex is not None
            and ex.language == "python"
            and ex.kernel is None
            and self.start_failures >= KERNEL_START_FAILURES
        ):
            self._finish(
                ex,
                status=protocol.STATUS_ERROR,
                error={"name": "InterpreterStartFailed", "value": reason, "traceback": ""},
            )

    def _kernel_output(self, k: Kernel, attr: str, data: bytes) -> None:
        ex = self.execution
        if ex is not None and ex.kernel is k:
            (ex.stdout if attr == "stdout_fd" else ex.stderr).feed(data)
        elif attr == "stderr_fd":
            tail = k.stderr_tail
            tail += data
            del tail[: max(0, len(tail) - STDERR_TAIL)]

    def _kernel_ctrl_event(self, k: Kernel, ev: int) -> None:
        if ev & select.POLLOUT:
            k.flush()
        if not ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
            return
        eof = not read_available(k.ctrl_fd, k.inbuf.extend, max_reads=256)
        messages = take_messages(k.inbuf, KERNEL_MAX_MESSAGE)
        if messages is None:
            k.kill("broke the control protocol")
            messages = []
        for message in messages:
            if self.kernel is not k:
                return
            self._kernel_message(k, message)
        if eof and self.kernel is k and k.ctrl_fd is not None:
            # Usually the process is exiting (its exit status comes with SIGCHLD); if it only
            # closed the socket, it cannot be talked to any more: kill it soon.
            k.ctrl.close()
            k.ctrl_fd = None
            k.kill_at = time.monotonic() + CTRL_EOF_KILL_S

    def _kernel_message(self, k: Kernel, message: dict) -> None:
        op = message.get("op")
        if op == "ready":
            k.ready = True
            version = message.get("python")
            k.python_version = version if isinstance(version, str) else ""
            self.start_failures = 0
            log.info("kernel %d ready (%.2fs)", k.pid, time.monotonic() - k.started)
            self._send_to_kernel()
            return
        if op != "done":
            return
        ex = self.execution
        if ex is None or ex.kernel is not k or message.get("id") != ex.seq:
            return
        # Drain what the cell printed: it was written before the kernel sent "done".
        pipes = {
            fd: attr for attr in ("stdout_fd", "stderr_fd") if (fd := getattr(k, attr)) is not None
        }
        for fd in readable(list(pipes)):
            read_available(fd, lambda data, a=pipes[fd]: self._kernel_output(k, a, data))
        result, outputs, error, bad = self._check_done(message)
        status = message.get("status")
        if status not in (protocol.STATUS_OK, protocol.STATUS_ERROR) or bad:
            status = protocol.STATUS_ERROR
        if ex.interrupt_reason is not None:
            status = ex.interrupt_reason
        if message.get("exiting") is True:
            k.retiring = True
            k.kill_at = time.monotonic() + CTRL_EOF_KILL_S
        ex.phases = self._phases(ex, message.get("kernel_at"))
        count = message.get("execution_count")
        restarted, self.state_lost = self.state_lost, False
        self._finish(
            ex,
            status=status,
            result=result,
            outputs=outputs,
            outputs_truncated=message.get("outputs_truncated") is True,
            result_truncated=message.get("result_truncated") is True,
            notes=message.get("output_notes"),
            error=error,
            execution_count=count if isinstance(count, int) else None,
            restarted=restarted,
        )

    @staticmethod
    def _phases(ex: Execution, kernel_at: Any) -> dict[str, float] | None:
        """Where an execution's time went, from the kernel's own stamps (same clock as ours):
        handing it over, the kernel's work, and the way back (reported, not trusted)."""
        if ex.sent_at is None or not isinstance(kernel_at, list) or len(kernel_at) != 2:
            return None
        received, replied = kernel_at
        if not (is_number(received) and is_number(replied)):
            return None
        now = time.monotonic()
        return {
            "agent_in": round((ex.sent_at - ex.started) * 1000, 3),
            "to_kernel": round((received - ex.sent_at) * 1000, 3),
            "kernel": round((replied - received) * 1000, 3),
            "from_kernel": round((now - replied) * 1000, 3),
        }

    @staticmethod
    def _check_done(message: dict) -> tuple[Any, list, dict | None, bool]:
        """Shallow checks on what the (untrusted) kernel reported."""

        def bundle_ok(b: Any) -> bool:
            return isinstance(b, dict) and all(isinstance(k, str) for k in b)

        result = message.get("result")
        outputs = message.get("outputs")
        error = message.get("error")
        bad = False
        if result is not None and not bundle_ok(result):
            result, bad = None, True
        if not isinstance(outputs, list) or not all(
            isinstance(o, dict) and bundle_ok(o.get("data")) for o in outputs
        ):
            outputs, bad = [], True
        if error is not None and not (
            isinstance(error, dict)
            and all(isinstance(error.get(f), str) for f in ("name", "value", "traceback"))
        ):
            error = None
            bad = True
        if bad and error is None:
            error = {
                "name": "InternalError",
                "value": "the interpreter reported a malformed result",
                "traceback": "",
            }
        return result, outputs, error, bad

    def _kernel_gone(self, k: Kernel, how: str) -> None:
        """The kernel process exited (or will not die): answer its execution, start another."""
        if self.kernel is not k:
            return
        ex = self.execution
        bound = ex is not None and ex.kernel is k
        k.kill_group()
        k.close_fds(sink=(lambda a, d: self._kernel_output(k, a, d)) if bound else None)
        self.kernel = None
        self.kernel_restarts += 1
        was_ready = k.ready
        tail = k.stderr_tail.decode("utf-8", "replace").strip()
        log.warning("kernel %d %s", k.pid, how)
        if not bound and k.used:
            self.state_lost = True
        if bound:
            if ex.interrupt_reason is not None and ex.abandon_at is not None:
                value = (
                    f"The execution did not stop within {self.interrupt_grace:g}s of the "
                    "interrupt, so the Python interpreter was killed and restarted: all state "
                    "(variables, imports, definitions) was lost."
                )
            else:
                value = (
                    f"The Python interpreter {how} and was restarted: all state (variables, "
                    "imports, definitions) was lost."
                )
            self.state_lost = False
            self._finish(
                ex,
                status=ex.interrupt_reason or protocol.STATUS_ERROR,
                error={"name": "InterpreterRestarted", "value": value, "traceback": ""},
                restarted=True,
            )
        if was_ready:
            self.start_kernel()
        else:
            self._kernel_start_failed(f"the interpreter {how} while starting: {tail[-2000:]}")


def describe_death(agent: Agent, k: Kernel, code: int) -> str:
    """How the kernel ended, for the user: the OOM killer named when the cgroup says it was."""
    if k.killed:
        return f"was killed by the agent ({k.kill_reason})"
    cgroup = agent.cgroup
    if cgroup is not None and cgroup.oom_kills(confine.KERNEL_LEAF) > k.oom_kills_before:
        return (
            "was killed by the out-of-memory killer: the session's processes went over their "
            f"memory limit of {cgroup.limits.memory_bytes >> 20} MiB"
        )
    return describe_exit(code)


def describe_exit(code: int) -> str:
    if code >= 0:
        return f"exited with code {code}"
    sig = -code
    try:
        name = signal.Signals(sig).name
    except ValueError:
        name = f"signal {sig}"
    hint = " (possibly out of memory)" if sig == signal.SIGKILL else ""
    return f"was killed by {name}{hint}"
