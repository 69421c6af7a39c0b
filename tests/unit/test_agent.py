"""The guest agent, run on the host over a socketpair and driven by the real AgentClient.

No VM: `agent.py --fd N --data-dir DIR --user none` serves one end of a socketpair, and its kernel
is this venv's Python with IPython. --interrupt-grace 1 keeps the kill-and-restart cases quick.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from shoal import protocol
from workers.agent_client import (
    AgentClient,
    AgentClientError,
    AgentDisconnected,
    AgentError,
    AgentProtocolError,
    AgentTimeout,
)

REPO = Path(__file__).resolve().parents[2]
AGENT = REPO / "vm-images" / "agent" / "agent.py"
GRACE = 1.0
# The kernel's interpreter; point it at one with the guest's versions (bookworm: IPython 8.5,
# matplotlib 3.6, numpy 1.24) to check compatibility. The agent itself runs on this one.
KERNEL_PYTHON = os.environ.get("SHOAL_TEST_KERNEL_PYTHON", sys.executable)
# The user the agent runs user code as. "none" (default) keeps root; with a real user (as in the
# guest) the kernel interpreter must be one that user can run, e.g. a venv outside /root.
AGENT_USER = os.environ.get("SHOAL_TEST_AGENT_USER", "none")


def give(*paths: Path) -> None:
    """Hand paths the test made as root to the agent's user, as if the user had made them."""
    if AGENT_USER == "none":
        return
    pw = pwd.getpwnam(AGENT_USER)
    for path in paths:
        os.lchown(path, pw.pw_uid, pw.pw_gid)


def make_root(tmp_path_factory) -> Path:
    """A directory for one agent; outside pytest's 0700 tree when a real user must reach it."""
    if AGENT_USER == "none":
        return tmp_path_factory.mktemp("agent")
    root = Path(tempfile.mkdtemp(prefix="shoal-agent-test-", dir="/tmp"))
    root.chmod(0o755)
    return root


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class RunningAgent:
    def __init__(self, root: Path, state_dir: Path, *extra: str):
        self.data = root / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        give(self.data)
        self.log = open(root / "agent.log", "wb")  # noqa: SIM115
        ours, theirs = socket.socketpair()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(AGENT),
                "--fd",
                str(theirs.fileno()),
                "--data-dir",
                str(self.data),
                "--user",
                AGENT_USER,
                "--state-dir",
                str(state_dir),
                "--interrupt-grace",
                str(GRACE),
                "--python",
                KERNEL_PYTHON,
                *extra,
            ],
            pass_fds=[theirs.fileno()],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        theirs.close()
        self.sock = ours
        self.client = AgentClient(ours, interrupt_grace_s=GRACE, answer_margin_s=10.0)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        self.client.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="session")
def state_dir(tmp_path_factory) -> Path:
    return make_root(tmp_path_factory) / "state"


@pytest.fixture(scope="module")
def agent(tmp_path_factory, state_dir):
    running = RunningAgent(make_root(tmp_path_factory), state_dir)
    yield running
    running.close()


@pytest.fixture()
def fresh_agent(tmp_path_factory, state_dir):
    running = RunningAgent(make_root(tmp_path_factory), state_dir)
    yield running
    running.close()


def run(agent: RunningAgent, code: str, **kwargs) -> dict:
    return agent.client.execute(code, **kwargs)


def in_thread(fn, *args, **kwargs):
    """Start fn in a thread; returns a callable that joins it and gives fn's return value."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # handed to the test thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()

    def join(timeout: float = 30):
        thread.join(timeout)
        assert not thread.is_alive(), "call did not return"
        if "error" in box:
            raise box["error"]
        return box["value"]

    return join


def wait_running(agent: RunningAgent, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not agent.client.ping()["busy"]:
        assert time.monotonic() < deadline
        time.sleep(0.02)


# --- execution -------------------------------------------------------------------------------
def test_state_persists_and_last_expression_is_the_result(agent):
    first = run(agent, "x = 41\nimport math")
    assert first["status"] == "ok"
    assert first["result"] is None
    answer = run(agent, "x + 1")
    assert answer["status"] == "ok"
    assert answer["result"] == {"text/plain": "42"}
    assert run(agent, "round(math.pi, 2)")["result"] == {"text/plain": "3.14"}
    assert run(agent, "x;")["result"] is None  # a trailing semicolon hides the value
    assert run(agent, "None")["result"] is None
    for field in ("stdout", "stderr", "outputs", "error", "exit_code", "duration_ms"):
        assert field in answer
    assert answer["interpreter_restarted"] is False
    assert answer["duration_ms"] >= 0


def test_cwd_is_the_data_dir_and_persists(agent):
    assert run(agent, "import os; os.getcwd()")["result"]["text/plain"] == repr(str(agent.data))
    run(agent, "os.makedirs('cwdtest', exist_ok=True); os.chdir('cwdtest')")
    assert run(agent, "os.getcwd()")["result"]["text/plain"].endswith("cwdtest'")
    run(agent, "os.chdir('..')")


def test_stdout_and_stderr_are_separate_and_capped(agent):
    answer = run(agent, "import sys\nprint('out')\nprint('err', file=sys.stderr)")
    assert (answer["stdout"], answer["stderr"]) == ("out\n", "err\n")
    assert answer["stdout_truncated"] is answer["stderr_truncated"] is False

    answer = run(
        agent,
        "print('é' * 5000)\nsys.stderr.write('x' * 30)",
        max_output=100,
    )
    assert answer["stdout"] == "é" * 100
    assert answer["stdout_truncated"] is True
    assert answer["stderr"] == "x" * 30
    assert answer["stderr_truncated"] is False

    # 64 MB of output is counted and dropped, not stored.
    answer = run(agent, "for _ in range(64):\n    print('y' * (1 << 20))", max_output=10)
    assert answer["stdout"] == "y" * 10
    assert answer["stdout_truncated"] is True

    # Output of child processes and C code (fd level) is captured too.
    answer = run(agent, "import os; os.system('echo from-a-child; echo oops >&2')")
    assert "from-a-child" in answer["stdout"]
    assert "oops" in answer["stderr"]


def test_exception_gives_error_with_plain_traceback(agent):
    answer = run(agent, "def f():\n    return 1 / 0\nprint('before')\nf()")
    assert answer["status"] == "error"
    assert answer["stdout"] == "before\n"
    error = answer["error"]
    assert error["name"] == "ZeroDivisionError"
    assert error["value"] == "division by zero"
    assert "ZeroDivisionError" in error["traceback"]
    assert "return 1 / 0" in error["traceback"]
    assert "\x1b[" not in error["traceback"]

    syntax = run(agent, "def (:")
    assert syntax["status"] == "error"
    assert syntax["error"]["name"] == "SyntaxError"


def test_text_that_is_not_utf8_never_breaks_the_interpreter_or_the_frames(agent):
    """A lone surrogate (no UTF-8 text can hold one) in an error, a display or a result's
    JSON: the interpreter lives, the text arrives with '?' in its place, NaN JSON is dropped."""
    run(agent, "kept = 41")
    raised = run(agent, "raise ValueError('bad \\udc80 text')")
    assert raised["status"] == "error" and not raised["interpreter_restarted"]
    assert raised["error"]["value"] == "bad ? text"
    shown = run(
        agent,
        "from IPython.display import display\n"
        "display({'text/plain': 'x\\ud800'}, raw=True)\n"
        "display({'application/json': {'a': float('nan')}}, raw=True)",
    )
    assert shown["status"] == "ok"
    assert shown["outputs"][0]["data"] == {"text/plain": "x?"}
    assert any("not JSON data" in note for note in shown["output_notes"])
    assert run(agent, "kept + 1")["result"] == {"text/plain": "42"}


def test_rich_results_by_mime_type(agent):
    answer = run(
        agent,
        "class Rich:\n"
        "    def __repr__(self): return 'Rich()'\n"
        "    def _repr_html_(self): return '<b>rich</b>'\n"
        "Rich()",
    )
    assert answer["result"] == {"text/plain": "Rich()", "text/html": "<b>rich</b>"}

    answer = run(agent, "from IPython.display import JSON, HTML, display\nJSON({'a': [1, 2]})")
    assert answer["result"]["application/json"] == {"a": [1, 2]}

    answer = run(
        agent, "display(HTML('<i>one</i>'))\nprint('between')\ndisplay(HTML('<i>two</i>'))"
    )
    assert [o["data"]["text/html"] for o in answer["outputs"]] == ["<i>one</i>", "<i>two</i>"]
    assert all(o["type"] == "display" for o in answer["outputs"])
    assert answer["stdout"] == "between\n"


def test_matplotlib_figures_become_png_outputs(agent):
    answer = run(agent, "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3]);")
    assert answer["status"] == "ok", answer["error"]
    assert answer["result"] is None
    assert len(answer["outputs"]) == 1
    data = answer["outputs"][0]["data"]
    assert base64.b64decode(data["image/png"]).startswith(PNG_MAGIC)
    assert data["text/plain"].startswith("<Figure")

    # plt.show() publishes at once; figures left open at the end are published too.
    answer = run(
        agent,
        "plt.figure(); plt.plot([3, 1]); plt.show()\n"
        "print('shown')\n"
        "plt.figure(); plt.bar([1], [2])",
    )
    assert len(answer["outputs"]) == 2
    assert answer["stdout"] == "shown\n"
    assert run(agent, "len(plt.get_fignums())")["result"]["text/plain"] == "0"

    # A figure as the last expression is the rich result.
    answer = run(agent, "fig = plt.figure(); plt.close(fig); fig")
    assert base64.b64decode(answer["result"]["image/png"]).startswith(PNG_MAGIC)


# --- output bounds (protocol.bound_answer; docs/limits.md "Outputs") ----------------------------
def test_small_rich_output_is_untouched_and_unflagged(agent):
    answer = run(agent, "from IPython.display import HTML, display\ndisplay(HTML('<i>x</i>'))\n7")
    assert answer["outputs"] == [{"type": "display", "data": {
        "text/html": "<i>x</i>", "text/plain": "<IPython.core.display.HTML object>"}}]  # fmt: skip
    assert answer["result"] == {"text/plain": "7"}
    assert answer["result_truncated"] is answer["outputs_truncated"] is False
    assert answer["output_notes"] == []


def test_displayed_text_is_cut_at_max_output_with_a_flag(agent):
    answer = run(
        agent,
        "from IPython.display import display, JSON\n"
        "display({'text/plain': 'A' * 2_000_000}, raw=True)\n"
        "display({'text/html': '<p>' * 1000, 'text/markdown': 'ok'}, raw=True)\n"
        "display(JSON({'k': 'v' * 100}))\n"
        "display(JSON({'k': 1}))\n"
        "'B' * 50",
        max_output=10,
    )
    assert answer["status"] == "ok", answer["error"]
    first, second, big_json, small_json = answer["outputs"]
    assert first == {"type": "display", "data": {"text/plain": "A" * 10}, "truncated": True}
    assert second["data"] == {"text/html": "<p>" * 3 + "<", "text/markdown": "ok"}
    assert second["truncated"] is True
    # A cut JSON document would not parse: over max_output it is dropped, its text stays.
    assert "application/json" not in big_json["data"] and big_json["truncated"] is True
    assert len(big_json["data"]["text/plain"]) <= 10
    assert small_json["data"]["application/json"] == {"k": 1}
    assert answer["outputs_truncated"] is True
    assert answer["result"] == {"text/plain": "'" + "B" * 9}
    assert answer["result_truncated"] is True
    notes = answer["output_notes"]
    assert "result: text/plain cut to 10 of 52 characters (max_output)" in notes
    assert "outputs[0]: text/plain cut to 10 of 2000000 characters (max_output)" in notes
    assert any(
        n.startswith("outputs[2]: application/json of 108 characters dropped") for n in notes
    )
    assert len(json.dumps(answer)) < 10_000  # the 2 MB never crossed the channel


IMAGES = (
    "import hashlib, os\n"
    "from IPython.display import display\n"
    "def png(n):\n"
    "    data = b'\\x89PNG\\r\\n\\x1a\\n' + os.urandom(n - 8)\n"
    "    print(hashlib.sha256(data).hexdigest())\n"
    "    return data\n"
)


def sha256_of(output: dict) -> str:
    return hashlib.sha256(base64.b64decode(output["data"]["image/png"])).hexdigest()


def test_images_are_kept_whole_within_the_budget_and_dropped_beyond_it(agent):
    # The default budget, 4 MiB: 3 MiB fits whole, 5 MiB more does not.
    answer = run(
        agent,
        IMAGES + "display({'image/png': png(3 << 20), 'text/plain': 'kept'}, raw=True)\n"
        "display({'image/png': png(5 << 20), 'text/plain': 'too big'}, raw=True)",
    )
    assert answer["status"] == "ok", answer["error"]
    kept, dropped = answer["outputs"]
    digests = answer["stdout"].split()
    assert sha256_of(kept) == digests[0] and "truncated" not in kept
    assert dropped == {"type": "display", "data": {"text/plain": "too big"}, "truncated": True}
    assert answer["outputs_truncated"] is True
    assert any(
        n.startswith(f"outputs[1]: image/png of {5 << 20} bytes dropped")
        for n in answer["output_notes"]
    ), answer["output_notes"]

    # A budget of the host's choosing is one budget for the whole execution, in order.
    answer = run(
        agent,
        IMAGES + "display({'image/png': png(60_000), 'text/plain': 'first'}, raw=True)\n"
        "display({'image/png': png(60_000), 'text/plain': 'second'}, raw=True)\n"
        "display({'image/png': png(10_000), 'text/plain': 'third'}, raw=True)",
        max_rich_output_bytes=100_000,
    )
    first, second, third = answer["outputs"]
    digests = answer["stdout"].split()
    assert sha256_of(first) == digests[0] and sha256_of(third) == digests[2]
    assert second == {"type": "display", "data": {"text/plain": "second"}, "truncated": True}
    assert [n.split(":")[0] for n in answer["output_notes"]] == ["outputs[1]"]


def test_a_figure_over_the_budget_keeps_its_text_and_says_so(agent):
    answer = run(
        agent, "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3]);", max_rich_output_bytes=500
    )
    assert answer["status"] == "ok", answer["error"]
    (figure,) = answer["outputs"]
    assert set(figure["data"]) == {"text/plain"} and figure["data"]["text/plain"].startswith("<Fig")
    assert figure["truncated"] is True
    assert "image/png" in answer["output_notes"][0]


def test_a_64_mib_result_is_cut_or_refused_and_says_so(agent):
    answer = run(agent, "'A' * (64 << 20)")
    assert answer["status"] == "ok", answer["error"]
    assert answer["result"] == {"text/plain": "'" + "A" * 4095}
    assert answer["result_truncated"] is True
    assert answer["output_notes"] == [
        f"result: text/plain cut to 4096 of {(64 << 20) + 2} characters (max_output)"
    ]
    # A 64 MiB image as the result: refused whole, its text kept, and said.
    answer = run(
        agent,
        "class Big:\n"
        "    def _repr_png_(self): return b'\\x89PNG\\r\\n\\x1a\\n' + bytes(64 << 20)\n"
        "Big()",
    )
    assert answer["status"] == "ok", answer["error"]
    assert set(answer["result"]) == {"text/plain"} and "Big" in answer["result"]["text/plain"]
    assert answer["result_truncated"] is True
    assert answer["output_notes"][0].startswith("result: image/png of 67108872 bytes dropped")


def test_a_flood_of_small_displays_is_bounded_by_the_budget(agent):
    answer = run(
        agent,
        "from IPython.display import display\nfor i in range(1000): display('x')",
        max_rich_output_bytes=10_000,
    )
    outputs = answer["outputs"]
    assert 0 < len(outputs) * (protocol.OUTPUT_COST + 3) <= 10_000 < 1000 * protocol.OUTPUT_COST
    assert answer["outputs_truncated"] is True
    assert answer["output_notes"][-1] == (
        f"outputs[{len(outputs)}:]: {1000 - len(outputs)} display outputs dropped: the "
        "execution's rich-output budget of 10000 bytes was spent"
    )


def test_the_agent_bounds_what_a_tampered_interpreter_reports(agent):
    """User code can change the interpreter's own bounds; the agent cuts again before answering."""
    answer = run(
        agent,
        "import shoal_kernel\n"
        "shoal_kernel.RICH.limit = shoal_kernel.RICH.budget = 1 << 40\n"
        "from IPython.display import display\n"
        "display({'text/plain': 'A' * 2_000_000}, raw=True)\n"
        "display({'image/png': bytes(5 << 20)}, raw=True)",
        max_output=10,
    )
    assert answer["outputs"] == [
        {"type": "display", "data": {"text/plain": "A" * 10}, "truncated": True},
        {"type": "display", "data": {}, "truncated": True},
    ]
    assert answer["output_notes"][0] == (
        "outputs[0]: text/plain cut to 10 of 2000000 characters (max_output)"
    )
    assert answer["output_notes"][1].startswith(f"outputs[1]: image/png of {5 << 20} bytes")
    assert run(agent, "shoal_kernel.RICH.limit")["result"] == {"text/plain": "4096"}


def test_clear_output_frees_the_budget(agent):
    answer = run(
        agent,
        "from IPython.display import display, clear_output\n"
        "for i in range(50):\n"
        "    clear_output(wait=True)\n"
        "    display({'text/plain': str(i) * 1000}, raw=True)",
        max_rich_output_bytes=5_000,
    )
    assert answer["outputs"] == [{"type": "display", "data": {"text/plain": "49" * 1000}}]
    assert answer["outputs_truncated"] is False and answer["output_notes"] == []


def test_interrupt_from_another_thread_stops_a_busy_loop(agent):
    run(agent, "kept = 'still here'")
    join = in_thread(run, agent, "while True:\n    pass", timeout_s=30)
    wait_running(agent)
    assert agent.client.interrupt() == {"interrupted": True}
    answer = join()
    assert answer["status"] == "interrupted"
    assert answer["interpreter_restarted"] is False
    assert answer["error"]["name"] == "KeyboardInterrupt"
    assert run(agent, "kept")["result"]["text/plain"] == "'still here'"


def test_an_interrupt_right_behind_the_execute_is_never_lost(fresh_agent):
    """execute and interrupt in one write: the SIGINT reaches the kernel before the cell starts.
    The kernel must still interrupt that cell (not ignore the signal, which would get it killed
    after the grace), and must not carry it over to the next cell."""
    sock = fresh_agent.sock
    sock.setblocking(True)
    for i in range(20):
        rid = 100 + 2 * i
        sock.sendall(
            protocol.encode({"id": rid, "op": "execute", "code": "while True: pass"})
            + protocol.encode({"id": rid + 1, "op": "interrupt"})
        )
        answers = {a["id"]: a for a in (read_raw(sock), read_raw(sock))}
        assert answers[rid + 1]["interrupted"] is True
        assert answers[rid]["status"] == "interrupted", answers[rid]
        assert answers[rid]["interpreter_restarted"] is False
        sock.sendall(protocol.encode({"id": rid + 1000, "op": "execute", "code": "'next'"}))
        assert read_raw(sock)["status"] == "ok"


def test_interrupt_stops_sleep_and_other_requests_are_busy(agent):
    join = in_thread(run, agent, "import time\ntime.sleep(30)", timeout_s=60)
    wait_running(agent)
    assert agent.client.ping()["busy"] is True
    assert agent.client.hello(packages=False)["busy"] is True
    with pytest.raises(AgentError) as info:
        agent.client.stat("")
    assert info.value.code == protocol.E_BUSY
    with pytest.raises(AgentError) as info:
        agent.client.execute("1")
    assert info.value.code == protocol.E_BUSY
    started = time.monotonic()
    agent.client.interrupt()
    answer = join()
    assert time.monotonic() - started < 2
    assert answer["status"] == "interrupted"
    assert agent.client.interrupt() == {"interrupted": False}  # nothing running now


def test_timeout_interrupts(agent):
    run(agent, "survivor = 7")
    started = time.monotonic()
    answer = run(agent, "import time\ntime.sleep(30)", timeout_s=0.5)
    elapsed = time.monotonic() - started
    assert answer["status"] == "timed_out"
    assert answer["interpreter_restarted"] is False
    assert 0.5 <= elapsed < 0.5 + GRACE
    assert run(agent, "survivor")["result"]["text/plain"] == "7"


def test_code_that_ignores_interrupts_is_killed_and_restarted(agent):
    run(agent, "doomed = 1")
    code = (
        "import time\n"
        "while True:\n"
        "    try:\n"
        "        time.sleep(10)\n"
        "    except KeyboardInterrupt:\n"
        "        print('ignoring it')\n"
    )
    started = time.monotonic()
    answer = run(agent, code, timeout_s=0.5)
    elapsed = time.monotonic() - started
    assert answer["status"] == "timed_out"
    assert answer["interpreter_restarted"] is True
    assert "lost" in answer["error"]["value"]
    assert "ignoring it" in answer["stdout"]
    assert 0.5 + GRACE <= elapsed < 0.5 + GRACE + 3
    answer = run(agent, "doomed")
    assert answer["status"] == "error"
    assert answer["error"]["name"] == "NameError"


def test_interpreter_restart_after_os_exit_loses_state(agent):
    run(agent, "precious = 1")
    answer = run(agent, "print('bye', flush=True)\nimport os\nos._exit(1)")
    assert answer["status"] == "error"
    assert answer["interpreter_restarted"] is True
    assert answer["stdout"] == "bye\n"
    assert "exited with code 1" in answer["error"]["value"]
    assert "state" in answer["error"]["value"] and "lost" in answer["error"]["value"]
    answer = run(agent, "precious")
    assert answer["error"]["name"] == "NameError"
    assert answer["interpreter_restarted"] is False


def test_interpreter_restart_after_segfault(agent):
    answer = run(agent, "import ctypes\nctypes.string_at(0)")
    assert answer["status"] == "error"
    assert answer["interpreter_restarted"] is True
    assert "SIGSEGV" in answer["error"]["value"]
    assert run(agent, "1 + 1")["result"]["text/plain"] == "2"
    assert agent.client.hello(packages=False)["kernel_restarts"] >= 1


def test_exit_or_death_between_executions_is_reported_on_the_next(agent):
    run(agent, "gone = 1")
    assert run(agent, "exit()")["status"] == "ok"
    answer = run(agent, "1 + 1")
    assert answer["result"] == {"text/plain": "2"}
    assert answer["interpreter_restarted"] is True
    assert run(agent, "gone")["error"]["name"] == "NameError"

    # The interpreter dies while idle (a thread of the user's ends it after the cell).
    code = (
        "import os, threading, time\n"
        "threading.Thread(target=lambda: (time.sleep(0.2), os._exit(3))).start()"
    )
    assert run(agent, code)["interpreter_restarted"] is False
    time.sleep(0.6)
    answer = run(agent, "'fresh'")
    assert answer["status"] == "ok" and answer["interpreter_restarted"] is True
    assert run(agent, "'steady'")["interpreter_restarted"] is False


def test_ipython_magics_and_bang_commands(agent):
    answer = run(agent, "!echo bang; echo err >&2")
    assert (answer["stdout"], answer["stderr"]) == ("bang\n", "err\n")
    answer = run(agent, "files = !ls /\n'etc' in files")
    assert answer["result"] == {"text/plain": "True"}
    answer = run(agent, "%matplotlib inline\nimport matplotlib.pyplot as plt\nplt.plot([1, 2]);")
    assert answer["status"] == "ok", answer["error"]
    assert [list(o["data"]) for o in answer["outputs"]] == [["text/plain", "image/png"]]
    assert run(agent, "input('name? ')")["error"]["name"] == "EOFError"


def test_code_limit_and_argument_checks(agent):
    for kwargs in (
        {"language": "cobol"},
        {"timeout_s": 0},
        {"timeout_s": -1},
        {"max_output": protocol.MAX_OUTPUT_CAP + 1},
        {"max_output": -1},
    ):
        with pytest.raises(AgentError) as info:
            agent.client.execute("1", **kwargs)
        assert info.value.code == protocol.E_INVALID, kwargs
    with pytest.raises(AgentError) as info:
        agent.client.execute("#" * (protocol.MAX_CODE_BYTES + 1))
    assert info.value.code == protocol.E_INVALID


# --- shell -----------------------------------------------------------------------------------
def test_shell_exit_codes_and_output(agent):
    answer = run(agent, "echo out; echo err >&2; pwd", language="shell")
    assert answer["status"] == "ok"
    assert answer["exit_code"] == 0
    assert answer["stdout"] == f"out\n{agent.data}\n"
    assert answer["stderr"] == "err\n"
    assert answer["result"] is None

    answer = run(agent, "echo partial; exit 3", language="shell")
    assert answer["status"] == "error"
    assert answer["exit_code"] == 3
    assert answer["stdout"] == "partial\n"

    answer = run(agent, "yes | head -c 100000", language="shell", max_output=50)
    assert answer["stdout_truncated"] is True
    assert len(answer["stdout"]) == 50


def test_shell_timeout_kills_the_process_group(agent):
    marker = agent.data / "shell-survivor"
    started = time.monotonic()
    answer = run(agent, f"(sleep 2; touch {marker}) & sleep 30", language="shell", timeout_s=0.5)
    assert answer["status"] == "timed_out"
    assert answer["exit_code"] == 128 + 9
    assert time.monotonic() - started < 2
    time.sleep(2.2)
    assert not marker.exists()  # the background job died with the group


def test_shell_interrupt(agent):
    join = in_thread(run, agent, "sleep 30", language="shell", timeout_s=60)
    wait_running(agent)
    agent.client.interrupt()
    answer = join()
    assert answer["status"] == "interrupted"
    assert answer["exit_code"] == 128 + 2


# --- files -----------------------------------------------------------------------------------
def test_file_put_get_list_stat_delete(agent):
    payload = os.urandom(5 * 1024 * 1024 + 123)
    pieces = [payload[i : i + 700_001] for i in range(0, len(payload), 700_001)]
    info = agent.client.put_file("ft/sub/data.bin", iter(pieces))
    assert info["path"] == "ft/sub/data.bin"
    assert info["size"] == len(payload)
    assert (agent.data / "ft/sub/data.bin").read_bytes() == payload

    chunks = list(agent.client.get_file("ft/sub/data.bin"))
    assert b"".join(chunks) == payload
    assert max(len(c) for c in chunks) <= protocol.FILE_CHUNK

    agent.client.put_file("/mnt/data/ft/abs.txt", [b"absolute"])
    assert (agent.data / "ft/abs.txt").read_bytes() == b"absolute"
    agent.client.put_file(str(agent.data / "ft/real-abs.txt"), [b"x"])
    agent.client.put_file("ft/empty", [])
    assert b"".join(agent.client.get_file("/mnt/data/ft/empty")) == b""

    stat = agent.client.stat("ft/sub/data.bin")
    assert stat["type"] == "file" and stat["size"] == len(payload)
    assert stat["name"] == "data.bin"
    assert abs(stat["mtime"] - time.time()) < 60
    assert agent.client.stat("ft")["type"] == "directory"

    listing = agent.client.list_files("ft")
    assert [e["path"] for e in listing] == ["ft/abs.txt", "ft/empty", "ft/real-abs.txt", "ft/sub"]
    deep = agent.client.list_files("ft", recursive=True)
    assert "ft/sub/data.bin" in [e["path"] for e in deep]
    assert any(e["path"] == "ft" for e in agent.client.list_files("", recursive=False))

    # the kernel sees the same files
    assert run(agent, "open('ft/abs.txt').read()")["result"]["text/plain"] == "'absolute'"

    with pytest.raises(AgentError) as info:
        agent.client.delete("ft/sub")
    assert info.value.code == protocol.E_NOT_EMPTY
    assert agent.client.delete("ft/sub/data.bin") == {"path": "ft/sub/data.bin", "type": "file"}
    agent.client.delete("ft/sub")
    agent.client.delete("ft", recursive=True)
    assert not (agent.data / "ft").exists()
    for call in (agent.client.stat, agent.client.delete, agent.client.get_file):
        with pytest.raises(AgentError) as info:
            call("ft/nothing")
        assert info.value.code == protocol.E_NOT_FOUND


def test_plain_and_ipython_cells_keep_ipython_semantics(agent):
    # Plain Python takes the kernel's fast path, IPython syntax the full run_cell: both keep
    # the execution count, `_`, magics, dedenting and tracebacks as IPython has them.
    assert run(agent, "fp = 3")["status"] == "ok"
    assert run(agent, "fp * 2")["result"]["text/plain"] == "6"
    assert run(agent, "_ + 1")["result"]["text/plain"] == "7"
    assert run(agent, "%time fp2 = fp")["status"] == "ok"
    assert run(agent, "    fp3 = fp2 + 1\n    fp3")["result"]["text/plain"] == "4"
    failed = run(agent, "def f():\n    return 1 / 0\nf()")
    assert failed["error"]["name"] == "ZeroDivisionError"
    assert "return 1 / 0" in failed["error"]["traceback"]
    first, second = (run(agent, "1")["execution_count"] for _ in range(2))
    assert second == first + 1


def test_a_repeated_cell_behaves_as_a_new_one(agent):
    # A cell run again verbatim reuses its compiled code: it must still be its own cell.
    run(agent, "rc = 0")
    for expected in (1, 2):
        answer = run(agent, "rc += 1\nrc")
        assert answer["result"]["text/plain"] == str(expected)
    tracebacks = []
    for _ in range(2):
        failed = run(agent, "rc / 0")
        assert failed["error"]["name"] == "ZeroDivisionError"
        tracebacks.append(failed["error"]["traceback"])
        count = failed["execution_count"]
        assert re.search(rf"Cell In ?\[{count}\]", tracebacks[-1]), tracebacks[-1]
    for _ in range(2):  # input history (`In`, `_i`) is kept for repeated cells too
        assert run(agent, "In[-1]")["result"]["text/plain"] == "'In[-1]'"
    assert run(agent, "_i")["result"]["text/plain"] == "'In[-1]'"


def test_prepare_snapshot_answers_and_leaves_the_host_alone(agent):
    # On the host (--no-system) the agent syncs but never writes to /proc/sys.
    assert agent.client.prepare_snapshot()["dropped"] is False
    assert run(agent, "1 + 1")["result"]["text/plain"] == "2"


def test_an_abandoned_upload_is_cancelled_and_leaves_nothing(agent):
    def source():
        yield b"x" * 300_000
        raise ValueError("the client went away")

    with pytest.raises(ValueError):
        agent.client.put_file("abandoned.bin", source())
    names = [e["name"] for e in agent.client.list_files("", recursive=True)]
    assert not any("abandoned" in n for n in names), names
    assert agent.client.put_file("after.bin", [b"ok"])["size"] == 2


def test_file_errors(agent):
    (agent.data / "fe").mkdir(exist_ok=True)
    (agent.data / "fe/file").write_text("f")
    give(agent.data / "fe", agent.data / "fe/file")
    cases = [
        (agent.client.get_file, "fe", protocol.E_IS_DIRECTORY),
        (agent.client.list_files, "fe/file", protocol.E_NOT_DIRECTORY),
        (agent.client.stat, "fe/file/below", protocol.E_NOT_DIRECTORY),
        (lambda p: agent.client.put_file(p, [b"x"]), "fe", protocol.E_IS_DIRECTORY),
        (lambda p: agent.client.put_file(p, [b"x"]), "fe/file/x", protocol.E_NOT_DIRECTORY),
        (agent.client.delete, "", protocol.E_INVALID),
    ]
    for call, path, code in cases:
        with pytest.raises(AgentError) as info:
            call(path)
        assert info.value.code == code, (path, info.value)
    os.mkfifo(agent.data / "fe/fifo")
    with pytest.raises(AgentError) as info:
        agent.client.get_file("fe/fifo")
    assert info.value.code == protocol.E_NOT_REGULAR
    assert agent.client.ping()["busy"] is False


def test_traversal_and_symlinks_are_refused(agent, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("secret")
    (agent.data / "links").mkdir(exist_ok=True)
    os.symlink(outside, agent.data / "links/dir")
    os.symlink(outside / "secret", agent.data / "links/file")
    os.symlink("/etc/passwd", agent.data / "passwd")
    give(agent.data / "links", agent.data / "links/dir", agent.data / "links/file")

    refused = [
        ("get", "../x"),
        ("get", "/etc/passwd"),
        ("get", "/mnt/data/../etc/passwd"),
        ("get", "links/../../x"),
        ("get", "links/dir/secret"),
        ("put", "../escape"),
        ("put", "/tmp/escape"),
        ("put", "links/dir/new"),
        ("put", "links/dir/sub/new"),
        ("list", "links/dir"),
        ("list", "/etc"),
        ("stat", "links/dir/secret"),
        ("delete", "links/dir/secret"),
        ("delete", "../data"),
    ]
    calls = {
        "get": agent.client.get_file,
        "put": lambda p: agent.client.put_file(p, [b"pwned"]),
        "list": agent.client.list_files,
        "stat": agent.client.stat,
        "delete": agent.client.delete,
    }
    for op, path in refused:
        with pytest.raises(AgentError) as info:
            calls[op](path)
        assert info.value.code == protocol.E_PATH_OUTSIDE, (op, path, info.value)
    # A path that ends at a link is not a regular file: neither read through nor written over.
    for op, path in [("get", "links/file"), ("get", "passwd"), ("put", "links/file")]:
        with pytest.raises(AgentError) as info:
            calls[op](path)
        assert info.value.code == protocol.E_NOT_REGULAR, (op, path, info.value)
        assert "symbolic link" in info.value.message
    assert os.readlink(agent.data / "links/file") == str(outside / "secret")
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    assert (outside / "secret").read_text() == "secret"

    # Links are shown as links, never followed, and deleting one removes only the link.
    assert agent.client.stat("links/dir")["type"] == "symlink"
    listing = agent.client.list_files("links", recursive=True)
    assert [(e["path"], e["type"]) for e in listing] == [
        ("links/dir", "symlink"),
        ("links/file", "symlink"),
    ]
    agent.client.delete("links/file")
    agent.client.delete("links", recursive=True)
    assert (outside / "secret").read_text() == "secret"


def test_abandoned_download_is_cancelled(agent):
    agent.client.put_file("big.bin", [os.urandom(4 * protocol.FILE_CHUNK)] * 8)
    stream = agent.client.get_file("big.bin")
    assert len(next(stream)) == protocol.FILE_CHUNK
    stream.close()
    assert agent.client.ping()["busy"] is False
    assert run(agent, "2 * 21")["result"]["text/plain"] == "42"
    agent.client.delete("big.bin")


def test_no_space_is_an_error_and_the_agent_lives(agent, tmp_path):
    # A 1 MiB tmpfs as the target directory (we are root in the test environment).
    small = agent.data / "small"
    small.mkdir(exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)])
    assert mounted.returncode == 0, "mounting a tmpfs needs root"
    give(small)
    try:
        with pytest.raises(AgentError) as info:
            agent.client.put_file("small/full.bin", [b"\0" * protocol.FILE_CHUNK] * 8)
        assert info.value.code == protocol.E_NO_SPACE
        assert os.listdir(small) == []  # the partial upload is gone
        assert agent.client.ping()["busy"] is False
        agent.client.put_file("small/fits.txt", [b"ok"])
    finally:
        subprocess.run(["umount", str(small)], check=True)


# --- info and reseed -------------------------------------------------------------------------
def test_hello(agent):
    info = agent.client.hello()
    assert info["protocol_version"] == protocol.PROTOCOL_VERSION
    assert info["agent_version"]
    kernel_python = run(agent, "import platform; platform.python_version()")["result"]
    assert kernel_python["text/plain"] == repr(info["python_version"])
    assert info["kernel"] == "ready"
    packages = {name.lower(): version for name, version in info["packages"].items()}
    assert "ipython" in packages and "matplotlib" in packages
    assert info["packages"] is not None and agent.client.hello()["packages"] == info["packages"]


def test_reseed_changes_random_numbers(agent):
    setup = (
        "import random, tempfile, uuid\nimport numpy as np\n"
        "random.seed(42); np.random.seed(42); tempfile._get_candidate_names()\n"
    )
    probe = "(random.random(), float(np.random.rand()), tempfile._name_sequence)"
    baseline = run(agent, setup + probe)["result"]["text/plain"]

    draws = []
    for entropy in (b"a" * 64, b"b" * 64):
        run(agent, setup)
        notes = agent.client.reseed(time_ns=time.time_ns(), entropy=entropy)
        assert notes["clock"].startswith("skipped")  # host tests never touch the host clock
        assert notes["kernel"] == "reseeded"
        draws.append(run(agent, probe)["result"]["text/plain"])
    assert draws[0] != baseline and draws[1] != baseline and draws[0] != draws[1]
    assert draws[0].endswith("None)")  # tempfile's name sequence is rebuilt on next use

    with pytest.raises(AgentError) as info:
        agent.client.reseed(entropy=b"short")
    assert info.value.code == protocol.E_INVALID


def test_reseed_records_the_identity_the_host_gave(agent, state_dir):
    notes = agent.client.reseed(identity="vm_0123abcd")
    assert notes["identity"] == "recorded"
    seen = run(agent, f"open({str(state_dir / 'identity')!r}).read()")["result"]["text/plain"]
    assert seen == "'vm_0123abcd'"
    with pytest.raises(AgentError) as info:
        agent.client.reseed(identity="../../etc/passwd")
    assert info.value.code == protocol.E_INVALID


# --- malformed frames ------------------------------------------------------------------------
def read_raw(sock: socket.socket, timeout: float = 10) -> dict:
    sock.settimeout(timeout)
    header = b""
    while len(header) < protocol.HEADER.size:
        header += sock.recv(protocol.HEADER.size - len(header))
    json_len, blob_len = protocol.parse_header(header, protocol.MAX_JSON_FROM_GUEST)
    body = b""
    while len(body) < json_len + blob_len:
        body += sock.recv(json_len + blob_len - len(body))
    return json.loads(body[:json_len])


def raw_ping(sock: socket.socket, rid: int) -> None:
    sock.sendall(protocol.encode({"id": rid, "op": "ping"}))
    answer = read_raw(sock)
    assert answer["id"] == rid and answer["ok"] is True


def test_malformed_frames_get_errors_and_the_agent_lives(fresh_agent):
    sock = fresh_agent.sock
    sock.setblocking(True)

    def expect(data: bytes, code: str, rid=None):
        sock.sendall(data)
        answer = read_raw(sock)
        assert answer["ok"] is False and answer["error"]["code"] == code, answer
        assert answer["id"] == rid
        raw_ping(sock, 1000)

    expect(b"GARBAGE! not a frame at all\n", protocol.E_BAD_FRAME)
    expect(
        protocol.HEADER.pack(protocol.MAGIC, protocol.MAX_JSON_TO_GUEST + 1, 0),
        protocol.E_BAD_FRAME,
    )
    expect(protocol.HEADER.pack(protocol.MAGIC, 10, protocol.MAX_BLOB + 1), protocol.E_BAD_FRAME)
    expect(protocol.HEADER.pack(protocol.MAGIC, 9, 0) + b"{not json", protocol.E_BAD_FRAME)
    expect(protocol.HEADER.pack(protocol.MAGIC, 7, 0) + b"[1,2,3]", protocol.E_BAD_FRAME)
    expect(protocol.encode({"id": 5, "op": "format_disk"}), protocol.E_UNKNOWN_OP, 5)
    expect(protocol.encode({"id": 6}), protocol.E_UNKNOWN_OP, 6)
    expect(protocol.encode({"id": "seven", "op": "ping"}), protocol.E_INVALID, "seven")
    expect(protocol.encode({"id": 8, "op": "execute", "code": 5}), protocol.E_INVALID, 8)
    expect(
        protocol.encode({"id": 9, "op": "execute", "code": "1", "timeout_s": "soon"}),
        protocol.E_INVALID,
        9,
    )
    expect(protocol.encode({"id": 10, "op": "file_stat", "path": 3}), protocol.E_INVALID, 10)
    expect(
        protocol.encode({"id": 11, "op": "file_list", "recursive": "yes"}), protocol.E_INVALID, 11
    )
    expect(protocol.encode({"id": 12, "op": "chunk"}, b"stray"), protocol.E_INVALID, 12)
    expect(protocol.encode({"id": 13, "op": "reseed", "entropy": "!!"}), protocol.E_INVALID, 13)

    # A frame split into single bytes is reassembled.
    frame = protocol.encode({"id": 14, "op": "execute", "code": "6 * 7"})
    for i in range(len(frame)):
        sock.send(frame[i : i + 1])
    answer = read_raw(sock)
    assert answer["id"] == 14 and answer["result"] == {"text/plain": "42"}

    # Garbage glued in front of a good frame: one error, then the frame is found again.
    sock.sendall(b"\x00\x01junk" + protocol.encode({"id": 15, "op": "ping"}))
    assert read_raw(sock)["error"]["code"] == protocol.E_BAD_FRAME
    assert read_raw(sock)["id"] == 15
    assert fresh_agent.alive()


def test_host_reconnect_drops_a_partial_frame(tmp_path, state_dir):
    path = str(tmp_path / "agent.sock")
    data = tmp_path / "data"
    data.mkdir()
    proc = subprocess.Popen(
        [
            sys.executable,
            str(AGENT),
            "--socket",
            path,
            "--data-dir",
            str(data),
            "--user",
            "none",
            "--state-dir",
            str(state_dir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(path):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        first = AgentClient.connect(path)
        assert first.execute("state = 'kept'")["status"] == "ok"
        frame = protocol.encode({"id": 99, "op": "execute", "code": "state = 'clobbered'"})
        first._sock.setblocking(True)
        first._sock.sendall(frame[:-3])  # the host goes away mid-frame
        first.close()
        second = AgentClient.connect(path)
        assert second.execute("state")["result"] == {"text/plain": "'kept'"}
        # a new connection replaces the old one
        third = AgentClient.connect(path)
        assert third.ping()["busy"] is False
        with pytest.raises(AgentClientError):
            second.ping(timeout=2)
        third.close()
    finally:
        proc.terminate()
        proc.wait(10)


# --- the client against a hostile guest ------------------------------------------------------
@pytest.fixture()
def fake_guest():
    host, guest = socket.socketpair()
    client = AgentClient(host)
    yield client, guest
    client.close()
    guest.close()


def answer_next_request(guest: socket.socket, reply) -> None:
    """Read one request frame from the client and send reply(request) back as raw bytes."""

    def serve():
        request = read_raw(guest)
        guest.sendall(reply(request))

    threading.Thread(target=serve, daemon=True).start()


def test_client_rejects_garbage(fake_guest):
    client, guest = fake_guest
    answer_next_request(guest, lambda r: b"HTTP/1.1 200 OK\r\n\r\n")
    with pytest.raises(AgentProtocolError):
        client.ping()
    with pytest.raises(AgentProtocolError):
        client.ping()  # the connection stays marked broken


def test_client_rejects_frames_nested_too_deeply(fake_guest):
    client, guest = fake_guest
    body = b"[" * 200_000 + b"]" * 200_000  # within the size limit, beyond any decoder's stack

    answer_next_request(guest, lambda r: protocol.HEADER.pack(protocol.MAGIC, len(body), 0) + body)
    with pytest.raises(AgentProtocolError, match="nested too deeply"):
        client.ping()


def test_the_kernel_framing_refuses_messages_nested_too_deeply():
    sys.path.insert(0, str(AGENT.parent))
    try:
        import shoal_kernel_framing as framing
    finally:
        sys.path.remove(str(AGENT.parent))
    nested = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
    buf = bytearray(framing.frame(nested))
    assert framing.take_messages(buf, len(nested)) is None
    buf = bytearray(framing.encode_message({"op": "done"}))
    assert framing.take_messages(buf, 1 << 20) == [{"op": "done"}]


def test_client_rejects_oversize_frames(fake_guest):
    client, guest = fake_guest
    answer_next_request(
        guest, lambda r: protocol.HEADER.pack(protocol.MAGIC, protocol.MAX_JSON_FROM_GUEST + 1, 0)
    )
    with pytest.raises(AgentProtocolError):
        client.ping()


def test_client_rejects_malformed_answers(fake_guest):
    client, guest = fake_guest
    answer_next_request(
        guest, lambda r: protocol.encode({"id": r["id"], "ok": True, "status": "ok"})
    )
    with pytest.raises(AgentProtocolError):
        client.execute("1")


def test_client_holds_a_hostile_answer_to_the_output_bounds(fake_guest):
    """A guest that ignores the bounds and says nothing was cut: the host cuts, flags and notes
    what it sent, whatever its flags say."""
    client, guest = fake_guest
    image = base64.b64encode(PNG_MAGIC + bytes(3 << 20)).decode()
    hostile = {
        "status": "ok",
        "stdout": "o" * 100_000,
        "stderr": "e" * 100_000,
        "stdout_truncated": False,
        "stderr_truncated": False,
        "result": {"text/plain": "r" * 1_000_000, "image/png": image, "x/evil": "z" * 1000},
        "result_truncated": False,
        "outputs": [
            {"type": "<script>", "data": {"text/html": "h" * 500_000}, "junk": "j" * 100_000},
            {"type": "display", "data": {"image/png": image, "text/plain": "fig"}},
            *[{"type": "display", "data": {"text/plain": "x"}}] * 50_000,
        ],
        "outputs_truncated": False,
        "output_notes": ["n" * 10_000] * 1000,
        "error": {"name": "E" * 100_000, "value": "v" * (1 << 20), "traceback": "t" * (1 << 20)},
        "exit_code": None,
        "interpreter_restarted": False,
        "duration_ms": 1.0,
    }
    answer_next_request(guest, lambda r: protocol.encode({"id": r["id"], "ok": True, **hostile}))
    budget = 1 << 20
    answer = client.execute("1", max_output=10, max_rich_output_bytes=budget)

    assert (answer["stdout"], answer["stderr"]) == ("o" * 10, "e" * 10)
    assert answer["stdout_truncated"] is answer["stderr_truncated"] is True
    assert answer["result"] == {"text/plain": "r" * 10}  # 3 MiB image over 1 MiB: dropped
    assert answer["result_truncated"] is True
    first, second, *rest = answer["outputs"]
    assert first == {"type": "display", "data": {"text/html": "h" * 10}, "truncated": True}
    assert second == {"type": "display", "data": {"text/plain": "fig"}, "truncated": True}
    assert 0 < len(rest) < 50_000 and all(o == {"type": "display", "data": {"text/plain": "x"}}
                                          for o in rest)  # fmt: skip
    assert (len(answer["outputs"]) * protocol.OUTPUT_COST) <= budget
    assert answer["outputs_truncated"] is True
    notes = answer["output_notes"]
    assert len(notes) <= protocol.MAX_NOTES and all(
        len(n) <= protocol.MAX_NOTE_CHARS for n in notes
    )
    # The host's own notes come first: a guest's notes cannot crowd them out.
    assert notes[0] == "result: text/plain cut to 10 of 1000000 characters (max_output)"
    assert any(n.startswith(f"result: image/png of {(3 << 20) + 8} bytes dropped") for n in notes)
    assert any("'x/evil' dropped" in n for n in notes)
    assert any(n.startswith("outputs[1]: image/png") for n in notes)
    assert any("display outputs dropped" in n for n in notes)
    error = answer["error"]
    assert len(error["name"]) <= protocol.MAX_ERROR_NAME
    assert len(error["value"]) <= protocol.MAX_ERROR_VALUE
    assert len(error["traceback"]) <= protocol.MAX_TRACEBACK


def test_client_keeps_a_bounded_answer_as_it_is(fake_guest):
    """What an honest guest sends within the bounds comes through unchanged (the re-check only
    measures), and its flags and notes stand."""
    client, guest = fake_guest
    honest = {
        "status": "ok",
        "stdout": "1234567890",
        "stderr": "",
        "stdout_truncated": True,
        "stderr_truncated": False,
        "result": {"text/plain": "'abcdefghi", "image/png": base64.b64encode(b"p" * 900).decode()},
        "result_truncated": True,
        "outputs": [{"type": "display", "data": {"text/plain": "x"}, "truncated": True}],
        "outputs_truncated": True,
        "output_notes": ["result: text/plain cut to 10 of 99 characters (max_output)"],
        "error": None,
        "exit_code": None,
        "interpreter_restarted": False,
        "duration_ms": 1.0,
    }
    answer_next_request(guest, lambda r: protocol.encode({"id": r["id"], "ok": True, **honest}))
    answer = client.execute("1", max_output=10, max_rich_output_bytes=900 + 10 + 64 + 1)
    assert answer == {**honest, "status": "ok"}


def test_client_error_timeout_and_disconnect(fake_guest):
    client, guest = fake_guest
    answer_next_request(
        guest, lambda r: protocol.encode(protocol.error_message(r["id"], "busy", "later"))
    )
    with pytest.raises(AgentError) as info:
        client.ping()
    assert info.value.code == "busy"

    started = time.monotonic()
    with pytest.raises(AgentTimeout):
        client.execute("1", timeout_s=0.2, grace_s=0.1)
    assert time.monotonic() - started < 1
    assert read_raw(guest)["op"] == "execute"  # the request that got no answer in time
    # a late answer to the abandoned call is dropped, the next call gets its own
    late = protocol.encode({"id": 2, "ok": True, "busy": False})
    answer_next_request(
        guest, lambda r: late + protocol.encode({"id": r["id"], "ok": True, "busy": True})
    )
    assert client.ping()["busy"] is True

    guest.close()
    with pytest.raises(AgentDisconnected):
        client.ping()


# --- privileges and memory -------------------------------------------------------------------
def test_unprivileged_user_for_shell_and_files(state_dir):
    """--user nobody: shell commands and file operations run with the user's uid.

    The kernel's "interpreter" is /bin/false, so every kernel start fails: the agent backs off
    and an execution waiting for a kernel gets a clear error in the end, not a hang.
    """
    root = Path(tempfile.mkdtemp(prefix="shoal-agent-test-", dir="/tmp"))
    try:
        root.chmod(0o755)
        data = root / "data"
        data.mkdir()
        nobody = pwd.getpwnam("nobody")
        os.chown(data, nobody.pw_uid, nobody.pw_gid)
        (data / "root-only").write_text("secret")
        (data / "root-only").chmod(0o600)
        ours, theirs = socket.socketpair()
        proc = subprocess.Popen(
            [
                sys.executable,
                str(AGENT),
                "--fd",
                str(theirs.fileno()),
                "--data-dir",
                str(data),
                "--user",
                "nobody",
                "--state-dir",
                str(root / "state"),
                "--python",
                "/bin/false",
            ],
            pass_fds=[theirs.fileno()],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        theirs.close()
        client = AgentClient(ours)
        try:
            answer = client.execute("id -u; echo $HOME; touch by-shell", language="shell")
            assert answer["stdout"] == f"{nobody.pw_uid}\n{data}\n", answer
            assert (data / "by-shell").stat().st_uid == nobody.pw_uid

            client.put_file("up/loaded.txt", [b"hello"])
            assert (data / "up").stat().st_uid == nobody.pw_uid
            assert (data / "up/loaded.txt").stat().st_uid == nobody.pw_uid
            with pytest.raises(AgentError) as info:
                client.get_file("root-only")
            assert info.value.code == protocol.E_PERMISSION

            answer = client.execute("1 + 1", timeout_s=30)
            assert answer["status"] == "error"
            assert answer["error"]["name"] == "InterpreterStartFailed"
            assert "exited with code 1 while starting" in answer["error"]["value"]
            assert proc.poll() is None
        finally:
            client.close()
            proc.wait(10)
    finally:
        shutil.rmtree(root)


def _peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_a_128_mb_file_streams_through_bounded_memory(fresh_agent):
    agent = fresh_agent
    size = 128 << 20
    block = os.urandom(1 << 20)
    digest = hashlib.sha256()

    def produce():
        for i in range(size >> 20):
            piece = block[i:] + block[:i]
            digest.update(piece)
            yield piece

    before = _peak_rss_mb(agent.proc.pid)
    assert agent.client.put_file("huge.bin", produce())["size"] == size
    back = hashlib.sha256()
    total = 0
    for chunk in agent.client.get_file("huge.bin"):
        back.update(chunk)
        total += len(chunk)
    assert total == size and back.digest() == digest.digest()
    assert _peak_rss_mb(agent.proc.pid) < before + 32
    agent.client.delete("huge.bin")
