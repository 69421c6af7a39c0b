"""Executions: the execute request, its timeout and interrupt, and its one answer.

An execution is Python (handed to the kernel, kernel_process.py) or shell (shell.py); either way
this is where it starts, where its output is captured, where its deadline and interrupt grace are
enforced (SIGINT, then SIGKILL), and where it is answered, once, whatever ended it. Executions is
the part of supervisor.Agent that does this. Standard library only.
"""

from __future__ import annotations

import codecs
import logging
import os
import signal
import subprocess
import time
from typing import TYPE_CHECKING, Any

from channel import BadRequest, json_bytes, read_available
from shell import killpg

from shoal import protocol

if TYPE_CHECKING:
    from kernel_process import Kernel

log = logging.getLogger("shoal.agent")

MAX_TIMEOUT_S = 24 * 3600.0
REAP_GRACE_S = 2.0  # after SIGKILL, answer even if the process has not been reaped yet
LANGUAGES = frozenset({"python", "shell"})


class Capture:
    """One output stream of an execution: the first `limit` characters kept, the rest counted."""

    def __init__(self, limit: int):
        self.limit = limit
        self.parts: list[str] = []
        self.chars = 0
        self.bytes = 0
        self.truncated = False
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def feed(self, data: bytes) -> None:
        self.bytes += len(data)
        if self.truncated:
            return
        self._add(self.decoder.decode(data))

    def _add(self, text: str) -> None:
        room = self.limit - self.chars
        if len(text) > room:
            text = text[:room]
            self.truncated = True
        if text:
            self.parts.append(text)
            self.chars += len(text)

    def text(self) -> str:
        if not self.truncated:
            self._add(self.decoder.decode(b"", final=True))
        return "".join(self.parts)


class Execution:
    """One execute request, from the request to its answer: python (sent to the kernel) or shell."""

    def __init__(
        self, request_id: int, language: str, code: str, timeout_s: float, limit: int, budget: int
    ):
        self.id = request_id
        self.language = language
        self.code = code
        self.started = time.monotonic()
        self.deadline = self.started + timeout_s
        self.timeout_s = timeout_s
        self.max_output = limit  # characters of stdout, stderr and each text part
        self.rich_budget = budget  # result + display outputs (protocol.bound_answer)
        self.stdout = Capture(limit)
        self.stderr = Capture(limit)
        self.interrupt_reason: str | None = None  # "interrupted" | "timed_out"
        self.kill_at: float | None = None  # interrupt grace runs out
        self.abandon_at: float | None = None  # killed but not reaped: answer anyway
        self.kernel: Kernel | None = None  # python: the kernel it was sent to
        self.seq = 0
        self.sent_at: float | None = None  # python: handed to the kernel
        self.phases: dict[str, float] | None = None  # python: where the time went (ms)
        self.proc: subprocess.Popen | None = None  # shell
        self.pipes: dict[int, Capture] = {}


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class Executions:
    """Part of supervisor.Agent: runs one execution at a time and answers it. The state is the
    Agent's."""

    execution: Execution | None
    kernel: Kernel | None
    exec_seq: int
    interrupt_grace: float
    kernel_start_at: float | None

    def op_execute(self, rid: int, message: dict) -> None:
        code = message.get("code")
        if not isinstance(code, str):
            raise BadRequest("code must be a string")
        if len(code) > protocol.MAX_CODE_BYTES or len(code.encode()) > protocol.MAX_CODE_BYTES:
            raise BadRequest(f"code is over {protocol.MAX_CODE_BYTES} bytes")
        language = message.get("language", "python")
        if language not in LANGUAGES:
            raise BadRequest(f"language must be one of {sorted(LANGUAGES)}")
        timeout_s = message.get("timeout_s", 60)
        if not is_number(timeout_s) or not 0 < timeout_s <= MAX_TIMEOUT_S:
            raise BadRequest(f"timeout_s must be a number in (0, {MAX_TIMEOUT_S:g}]")
        limit = message.get("max_output", protocol.DEFAULT_MAX_OUTPUT)
        if not isinstance(limit, int) or isinstance(limit, bool):
            raise BadRequest("max_output must be an integer")
        if not 0 <= limit <= protocol.MAX_OUTPUT_CAP:
            raise BadRequest(f"max_output must be between 0 and {protocol.MAX_OUTPUT_CAP}")
        budget = message.get("max_rich_output_bytes", protocol.DEFAULT_RICH_OUTPUT_BYTES)
        if not isinstance(budget, int) or isinstance(budget, bool):
            raise BadRequest("max_rich_output_bytes must be an integer")
        if not 0 <= budget <= protocol.MAX_RICH_OUTPUT_BYTES:
            raise BadRequest(
                f"max_rich_output_bytes must be between 0 and {protocol.MAX_RICH_OUTPUT_BYTES}"
            )
        ex = Execution(rid, language, code, float(timeout_s), limit, budget)
        self.execution = ex
        if language == "shell":
            self._start_shell(ex)
        else:
            self._send_to_kernel()

    def _send_to_kernel(self) -> None:
        ex = self.execution
        k = self.kernel
        if ex is None or ex.language != "python" or ex.kernel is not None:
            return
        if k is None or not k.ready or k.killed or k.retiring:
            return  # sent when the kernel says ready (or its successor does)
        self.exec_seq += 1
        ex.seq = self.exec_seq
        ex.kernel = k
        k.used = True
        ex.sent_at = time.monotonic()  # before: on one vCPU the kernel may run the cell at once
        k.send(
            {
                "op": "execute",
                "id": ex.seq,
                "code": ex.code,
                "max_output": ex.max_output,
                "max_rich": ex.rich_budget,
            }
        )

    def _interrupt(self, ex: Execution, reason: str) -> None:
        if ex.interrupt_reason is not None:
            return
        ex.interrupt_reason = reason
        now = time.monotonic()
        if ex.language == "shell":
            if ex.proc is not None:
                if reason == protocol.STATUS_TIMED_OUT:
                    self._kill_shell(ex)
                    ex.abandon_at = now + REAP_GRACE_S
                else:
                    killpg(ex.proc.pid, signal.SIGINT)
                    ex.kill_at = now + self.interrupt_grace
            return
        if ex.kernel is None:
            what = "timed out" if reason == protocol.STATUS_TIMED_OUT else "was interrupted"
            self._finish(
                ex,
                status=reason,
                error={
                    "name": "InterpreterNotReady",
                    "value": f"the execution {what} while the interpreter was still starting",
                    "traceback": "",
                },
            )
            return
        ex.kernel.interrupt(ex.seq)
        ex.kill_at = now + self.interrupt_grace

    def _timers(self) -> None:
        now = time.monotonic()
        ex = self.execution
        if ex is not None:
            if ex.interrupt_reason is None and now >= ex.deadline:
                self._interrupt(ex, protocol.STATUS_TIMED_OUT)
            if ex.kill_at is not None and now >= ex.kill_at:
                ex.kill_at = None
                ex.abandon_at = now + REAP_GRACE_S
                if ex.language == "shell":
                    self._kill_shell(ex)
                elif ex.kernel is not None:
                    ex.kernel.kill(f"did not stop within {self.interrupt_grace:g}s of SIGINT")
            if ex.abandon_at is not None and now >= ex.abandon_at and self.execution is ex:
                log.error("process of execution %s not reaped after SIGKILL", ex.id)
                if ex.language == "python" and self.kernel is ex.kernel and self.kernel:
                    self._kernel_gone(self.kernel, "did not exit after SIGKILL")
                else:
                    self._finish(ex, status=ex.interrupt_reason or protocol.STATUS_ERROR)
        k = self.kernel
        if k is not None and k.kill_at is not None and now >= k.kill_at:
            k.kill_at = None
            k.kill("closed its control socket")
        if self.kernel_start_at is not None and now >= self.kernel_start_at:
            self.kernel_start_at = None
            self.start_kernel()

    def _finish(
        self,
        ex: Execution,
        status: str,
        result: Any = None,
        outputs: list | None = None,
        outputs_truncated: bool = False,
        result_truncated: bool = False,
        notes: Any = None,
        error: dict | None = None,
        exit_code: int | None = None,
        restarted: bool = False,
        execution_count: int | None = None,
    ) -> None:
        if self.execution is not ex:
            return
        self.execution = None
        for fd in list(ex.pipes):
            read_available(fd, ex.pipes[fd].feed)
            os.close(fd)
        ex.pipes.clear()
        answer = {
            "status": status,
            "stdout": ex.stdout.text(),
            "stderr": ex.stderr.text(),
            "stdout_truncated": ex.stdout.truncated,
            "stderr_truncated": ex.stderr.truncated,
            "result": result,
            "result_truncated": result_truncated,
            "outputs": outputs or [],
            "outputs_truncated": outputs_truncated,
            "output_notes": notes,
            "error": error,
            "exit_code": exit_code,
            "interpreter_restarted": restarted,
            "execution_count": execution_count,
            "duration_ms": round((time.monotonic() - ex.started) * 1000, 3),
            "phases_ms": ex.phases,
            "id": ex.id,
            "ok": True,
        }
        # The interpreter runs user code: what it reported is held to the request's bounds here,
        # before it crosses the channel (the host checks again).
        protocol.bound_answer(answer, ex.max_output, ex.rich_budget)
        body = json_bytes(answer)
        if len(body) > protocol.MAX_JSON_FROM_GUEST:
            drop_rich(answer, f"the answer was over the {protocol.MAX_JSON_FROM_GUEST}-byte limit")
            body = json_bytes(answer)
        self.send_body(body)


def drop_rich(answer: dict, why: str) -> None:
    """Drop the result and display outputs of an answer too large to send, saying so."""
    if answer["result"] is not None:
        answer["result_truncated"] = True
    if answer["outputs"]:
        answer["outputs_truncated"] = True
    answer.update(result=None, outputs=[])
    protocol.add_note(answer["output_notes"], f"result and display outputs dropped: {why}")
