"""Shell executions: `bash -c CODE` as the sandbox user, its output captured, its exit answered.

The shell language of the execute request (executions.py does the rest of an execution's life:
the deadline, the interrupt, the answer). ShellExecutions is the part of supervisor.Agent that
starts the command and turns its exit status into the answer; _kill_shell() ends its processes.
Standard library only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import confine
from channel import set_nonblocking

from shoal import protocol

if TYPE_CHECKING:
    import files
    from executions import Execution


def killpg(pgid: int, sig: int) -> None:
    """Signal a process group that may be gone already."""
    with contextlib.suppress(OSError):
        os.killpg(pgid, sig)


class ShellExecutions:
    """Part of supervisor.Agent: a shell command's process. The state is the Agent's."""

    data_dir: files.DataDir
    user_env: dict[str, str]
    user_process: Callable[[str], dict[str, Any]]
    cgroup: confine.UserCgroup | None

    def _start_shell(self, ex: Execution) -> None:
        try:
            proc = subprocess.Popen(
                ["/bin/bash", "-c", ex.code],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=self.data_dir.root,
                env=self.user_env,
                process_group=0,
                **self.user_process(confine.SHELL_LEAF),
            )
        except (OSError, subprocess.SubprocessError) as exc:
            self._finish(
                ex,
                status=protocol.STATUS_ERROR,
                error={"name": "ShellStartFailed", "value": str(exc), "traceback": ""},
            )
            return
        ex.proc = proc
        for stream, capture in ((proc.stdout, ex.stdout), (proc.stderr, ex.stderr)):
            fd = os.dup(stream.fileno())
            stream.close()
            set_nonblocking(fd)
            ex.pipes[fd] = capture

    def _kill_shell(self, ex: Execution) -> None:
        """SIGKILL a shell command's process group and, in the guest, every process it started
        (the shell cgroup leaf), however it detached."""
        if ex.proc is not None:
            killpg(ex.proc.pid, signal.SIGKILL)
        if self.cgroup is not None:
            self.cgroup.kill(confine.SHELL_LEAF)

    def _shell_exited(self, ex: Execution, code: int) -> None:
        # What the command left running in the background ends with it (in the guest).
        if self.cgroup is not None:
            self.cgroup.kill(confine.SHELL_LEAF)
        exit_code = code if code >= 0 else 128 - code
        status = protocol.STATUS_OK if code == 0 else protocol.STATUS_ERROR
        error = None
        if code != 0:
            how = f"exit code {code}" if code > 0 else f"signal {-code}"
            error = {"name": "ShellError", "value": f"command ended with {how}", "traceback": ""}
        if ex.interrupt_reason is not None:
            status = ex.interrupt_reason
        self._finish(ex, status=status, error=error, exit_code=exit_code)
