"""The interpreter process ("kernel") that the agent supervises: runs user code with IPython.

Started by the agent (kernel_process.py) as the sandbox user with cwd = the data directory:

    python3 kernel.py          (environment: SHOAL_KERNEL_FD, MPLBACKEND, MPLCONFIGDIR, ...)

kernel.py only imports this module (so the byte-code compiled at image build time is used).

- fd 0 is /dev/null; fds 1 and 2 are pipes the agent reads and caps (so output of
  subprocesses and C code is captured as well as print()).
- SHOAL_KERNEL_FD is a socket to the agent carrying JSON messages, framed as in
  shoal_kernel_framing.py (which the agent imports too):
    agent -> kernel  {"op": "execute", "id": n, "code": str, "max_output": int,
                      "max_rich": int (the rich-output budget, bytes)}
                     {"op": "reseed", "seed": base64}
    kernel -> agent  {"op": "ready", "pid": int, "ipython": str}
                     {"op": "done", "id": n, "status": "ok"|"error", "result",
                      "result_truncated", "outputs", "outputs_truncated", "output_notes",
                      "error", "execution_count",
                      "kernel_at": [received, replied] (time.monotonic(), for the phases)}
  The kernel runs user code, so the agent treats everything it says as untrusted.
- SHOAL_INTERRUPT_FD is a shared 8-byte memfd: the agent writes an execution id there before it
  sends SIGINT, and KeyboardInterrupt is raised only in that execution's cell (see Interrupts).

Output is held to the execute request's bounds as it is collected (shoal/protocol.py
bound_bundle, loaded as the private module shoal_protocol): text parts cut at max_output
characters, images kept whole within the rich-output budget or dropped (before they are ever
base64-encoded), each cut or drop flagged and noted. The agent and the host check again.

Standard library plus IPython; matplotlib only when the user imports it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib.abc
import importlib.util
import mmap
import os
import re
import signal
import socket
import struct
import sys
import threading
import time

from shoal_fast_path import compile_fresh, run_cell_fast
from shoal_kernel_framing import encode_message, frame, json_utf8, take_messages

HERE = os.path.dirname(os.path.abspath(__file__))
MAX_COMMAND = 8 << 20
RECV_SIZE = 64 << 10  # under malloc's mmap threshold: recv(n) allocates n bytes each call
MAX_REPLY = 28 << 20  # the agent kills a kernel whose message is over 30 MiB
FLUSH_INTERVAL_S = 0.1
FLUSH_LINGER_S = 2.0
MPL_BACKEND_MODULE = "shoal_mpl_backend"
ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")


def _load_protocol():
    """shoal/protocol.py, whose bounds the agent and the host apply too, as the private module
    shoal_protocol: next to this file in the guest image, at the repository's root in a source
    checkout. Not `import shoal`: a `shoal` package of the user's stays theirs."""
    for parts in (("shoal",), (os.pardir, os.pardir, "shoal")):
        path = os.path.join(HERE, *parts, "protocol.py")
        if os.path.exists(path):
            break
    spec = importlib.util.spec_from_file_location("shoal_protocol", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["shoal_protocol"] = module
    spec.loader.exec_module(module)
    return module


P = _load_protocol()


def strip_ansi(text: str) -> str:
    return ANSI_RE.sub("", text)


class AgentLink:
    """The socket inherited from the agent, framed by shoal_kernel_framing."""

    def __init__(self, fd: int):
        self.sock = socket.socket(fileno=fd)
        self.sock.set_inheritable(False)
        self.sock.setblocking(True)
        self.buf = bytearray()
        self.pending: list[dict] = []  # complete messages a recv() brought beyond the first

    def recv(self) -> dict | None:
        """The next message; None when the agent went away. One recv() usually brings a
        whole message (each syscall counts under TCG)."""
        pending = self.pending
        while not pending:
            data = self.sock.recv(RECV_SIZE)
            if not data:
                return None
            self.buf += data
            messages = take_messages(self.buf, MAX_COMMAND)
            if messages is None:
                raise SystemExit("kernel: a command from the agent broke the framing")
            pending += messages
        return pending.pop(0)

    def send(self, framed: bytes) -> None:
        """One message as framed by encode_message() or frame()."""
        self.sock.sendall(framed)


def encode(message: dict) -> bytes:
    return json_utf8(message, default=str)


def encode_reply(reply: dict) -> bytes:
    """The reply as bytes, under MAX_REPLY: rich outputs are dropped first if it is not."""
    try:
        body = encode(reply)
    except (TypeError, ValueError) as exc:
        body = b""
        reply["error"] = reply["error"] or {
            "name": "InternalError",
            "value": f"result could not be serialised: {exc}",
            "traceback": "",
        }
    if not body or len(body) > MAX_REPLY:
        if reply["result"] is not None:
            reply["result_truncated"] = True
        if reply["outputs"]:
            reply["outputs_truncated"] = True
        reply.update(result=None, outputs=[])
        why = "could not be serialised" if not body else f"were over {MAX_REPLY} bytes"
        P.add_note(
            reply.setdefault("output_notes", []), f"result and display outputs dropped: they {why}"
        )
        body = encode(reply)
    return body


class RichOutput:
    """Result and display outputs of the running cell, within the execution's bounds: text
    parts cut at max_output characters, everything within the rich-output budget
    (shoal/protocol.py bound_bundle, the same rules the agent and the host check)."""

    def __init__(self) -> None:
        self.reset(0, 0)

    def reset(self, budget: int, limit: int) -> None:
        self.budget = budget
        self.limit = limit
        self.used = 0  # of the budget: the result's cost plus the outputs'
        self.result: dict | None = None
        self.result_cost = 0
        self.result_truncated = False
        self.result_notes: list[str] = []
        self.outputs: list[dict] = []
        self.truncated = False
        self.output_notes: list[str] = []
        self.dropped = 0  # display outputs that came after the budget was spent
        self.traceback: str | None = None

    def set_result(self, data: dict) -> None:
        self.used -= self.result_cost  # a second displayhook call replaces the first value
        self.result_notes = []
        bundle, cost, cut = P.bound_bundle(
            carried(data), "result", self.limit, self.budget - self.used, self.result_notes
        )
        self.used += cost
        self.result_cost = cost
        self.result = bundle or None
        self.result_truncated = cut

    def add_display(self, data: dict) -> None:
        room = self.budget - self.used - P.OUTPUT_COST
        if room < 0:
            self.dropped += 1
            self.truncated = True
            return
        where = f"outputs[{len(self.outputs)}]"
        bundle, cost, cut = P.bound_bundle(
            carried(data), where, self.limit, room, self.output_notes
        )
        if not bundle and not cut:
            return  # nothing of a type the protocol carries
        self.used += P.OUTPUT_COST + cost
        output = {"type": "display", "data": bundle}
        if cut:
            output["truncated"] = self.truncated = True
        self.outputs.append(output)

    def clear(self) -> None:
        """clear_output(): the outputs so far, and what was said about them, are gone."""
        self.outputs.clear()
        self.output_notes = []
        self.dropped = 0
        self.truncated = False
        self.used = self.result_cost

    def notes(self) -> list[str]:
        notes: list[str] = []
        for note in self.result_notes + self.output_notes:
            P.add_note(notes, note)
        if self.dropped:
            P.add_note(
                notes,
                f"outputs[{len(self.outputs)}:]: {self.dropped} display outputs dropped: the "
                f"execution's rich-output budget of {self.budget} bytes was spent",
            )
        return notes


def carried(data: dict) -> dict:
    """The parts of a format dict of the MIME types the protocol carries (IPython may add
    others, e.g. a widget's view: those are not sent)."""
    return {mime: data[mime] for mime in P.RICH_MIMES if mime in data}


RICH = RichOutput()


class _BackendFinder(importlib.abc.MetaPathFinder):
    """Makes the matplotlib backend next to this file importable without putting this directory
    (agent.py, files.py, ...) on the user's sys.path."""

    def find_spec(self, fullname, path, target=None):
        if fullname != MPL_BACKEND_MODULE:
            return None
        return importlib.util.spec_from_file_location(
            fullname, os.path.join(HERE, MPL_BACKEND_MODULE + ".py")
        )


def _figure_png(fig) -> bytes:
    import io

    buf = io.BytesIO()
    fig.canvas.print_figure(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def make_shell():
    from IPython.core.displayhook import DisplayHook
    from IPython.core.displaypub import DisplayPublisher
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets import Type
    from traitlets.config import Config

    class ShoalDisplayHook(DisplayHook):
        """The last expression's value becomes the answer's `result` instead of 'Out[n]:'."""

        def start_displayhook(self):
            pass

        def write_output_prompt(self):
            pass

        def write_format_data(self, format_dict, md_dict=None):
            RICH.set_result(format_dict)

        def log_output(self, format_dict):
            pass  # IPython would keep every repr forever in history_manager.output_hist_reps

        def finish_displayhook(self):
            pass

    class ShoalDisplayPublisher(DisplayPublisher):
        def publish(self, data, metadata=None, *args, **kwargs):
            RICH.add_display(data)

        def clear_output(self, wait=False):
            RICH.clear()

    class ShoalShell(InteractiveShell):
        displayhook_class = Type(ShoalDisplayHook)
        display_pub_class = Type(ShoalDisplayPublisher)

        def _showtraceback(self, etype, evalue, stb):
            RICH.traceback = strip_ansi("\n".join(stb))

        def enable_gui(self, gui=None):
            pass  # no GUI event loops here; %matplotlib falls back to our Agg-based backend

        def ask_exit(self):
            # exit()/quit(): end this interpreter once the cell has been answered; the agent
            # starts a fresh one (and reports interpreter_restarted on the next execution).
            self.exit_now = True

        def system(self, cmd):
            # `!cmd`: a plain subprocess on our fds, not IPython's default pseudo-terminal (which
            # needs /dev/pts, turns newlines into CRLF and merges stderr into stdout).
            _flush_std()
            return self.system_raw(cmd)

    cfg = Config()
    cfg.HistoryManager.enabled = False  # no sqlite file, no saving thread
    cfg.InteractiveShell.colors = "nocolor"
    cfg.InteractiveShell.autocall = 0
    cfg.InteractiveShell.autoindent = False
    shell = ShoalShell.instance(config=cfg)
    png = shell.display_formatter.formatters["image/png"]
    png.for_type_by_name("matplotlib.figure", "Figure", _figure_png)
    return shell


class Interrupts:
    """Which execution an interrupt is for, so none is lost or hits the wrong cell.

    The agent writes the execution's id into a shared 8-byte memfd (SHOAL_INTERRUPT_FD) and then
    sends SIGINT. The handler raises KeyboardInterrupt only while that execution's cell runs; a
    SIGINT that lands before the cell started is caught by the check at the start of the cell,
    and one that lands after it ended (a stale one) is ignored.
    """

    def __init__(self) -> None:
        self.shared: mmap.mmap | None = None
        self.seq = -1
        self.in_cell = False

    def attach(self, fd: int) -> None:
        self.shared = mmap.mmap(fd, 8)
        os.close(fd)

    def requested(self) -> bool:
        return self.shared is not None and struct.unpack_from("<Q", self.shared)[0] == self.seq

    def handler(self, signum, frame) -> None:
        if self.in_cell and self.requested():
            raise KeyboardInterrupt


INTERRUPTS = Interrupts()


def flush_figures() -> None:
    """Show the figures left open by the cell (as Jupyter's inline backend does), then close."""
    if "matplotlib.pyplot" not in sys.modules:
        return
    try:
        backend = __import__(MPL_BACKEND_MODULE)
        backend.flush_figures()
    except Exception as exc:  # a figure that fails to render must not kill the kernel
        print(f"could not render figure: {exc!r}", file=sys.stderr)


def _flush_std() -> None:
    for stream in {
        id(s): s for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
    }.values():
        try:
            if stream is not None:
                stream.flush()
        except Exception:
            pass


class Flusher(threading.Thread):
    """Flushes stdout/stderr every FLUSH_INTERVAL_S while a cell runs, so output printed before
    the kernel is killed (grace expired, OOM) reaches the agent.

    Waking a thread for every cell would cost more than a short cell itself, so after a cell the
    flusher keeps ticking for FLUSH_LINGER_S (cells in a row find it awake and `wake()` costs
    nothing), then blocks without a timeout: an idle kernel stays idle."""

    def __init__(self) -> None:
        super().__init__(name="shoal-flusher", daemon=True)
        self.wanted = threading.Event()
        self.running = False  # a cell is running (set and cleared by the main thread)
        self.last_cell = 0.0

    def wake(self) -> None:
        self.running = True
        if not self.wanted.is_set():
            self.wanted.set()

    def done(self) -> None:
        self.running = False
        self.last_cell = time.monotonic()

    def run(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # SIGINT is the main thread's
        while True:
            self.wanted.wait()
            time.sleep(FLUSH_INTERVAL_S)
            if self.running:
                with FLUSH_LOCK:
                    _flush_std()
            elif time.monotonic() - self.last_cell > FLUSH_LINGER_S:
                self.wanted.clear()
                if self.running:  # a cell started between the check and the clear
                    self.wanted.set()


FLUSHER = Flusher()
# A fork (multiprocessing) must not copy a stream lock held by the flusher into the child.
FLUSH_LOCK = threading.Lock()
os.register_at_fork(
    before=FLUSH_LOCK.acquire,
    after_in_parent=FLUSH_LOCK.release,
    after_in_child=FLUSH_LOCK.release,
)


def execute(shell, message: dict) -> dict:
    RICH.reset(
        int(message.get("max_rich", P.DEFAULT_RICH_OUTPUT_BYTES)),
        int(message.get("max_output", P.DEFAULT_MAX_OUTPUT)),
    )
    result = None
    interrupted_late = False
    FLUSHER.wake()
    INTERRUPTS.seq = message.get("id")
    try:
        INTERRUPTS.in_cell = True
        try:
            if INTERRUPTS.requested():
                raise KeyboardInterrupt  # interrupted before it started
            result = run_cell_fast(shell, message["code"])
            if result is None:
                result = shell.run_cell(message["code"], store_history=True)
            flush_figures()
        finally:
            INTERRUPTS.in_cell = False
            if signal.getsignal(signal.SIGINT) != INTERRUPTS.handler:
                signal.signal(signal.SIGINT, INTERRUPTS.handler)  # user code replaced it
    except KeyboardInterrupt:
        interrupted_late = True  # outside the user's code: before it, or after it ended
    FLUSHER.done()
    _flush_std()
    error = None
    status = "ok"
    exc = None
    if result is not None:
        exc = result.error_before_exec or result.error_in_exec
    if exc is not None or interrupted_late:
        status = "error"
        if exc is None:
            name, value = "KeyboardInterrupt", ""
        else:
            name, value = type(exc).__name__, str(exc)
        error = {
            "name": P.clip(name, P.MAX_ERROR_NAME),
            "value": P.clip(value, P.MAX_ERROR_VALUE),
            "traceback": P.clip(RICH.traceback or f"{name}: {value}", P.MAX_TRACEBACK),
        }
    return {
        "op": "done",
        "id": message.get("id"),
        "status": status,
        "result": RICH.result,
        "result_truncated": RICH.result_truncated,
        "outputs": RICH.outputs,
        "outputs_truncated": RICH.truncated,
        "output_notes": RICH.notes(),
        "error": error,
        "execution_count": shell.execution_count - 1,
        "exiting": bool(shell.exit_now),  # exit() was called: this process ends after replying
    }


def warm_up(shell) -> None:
    """Format one traceback the way a failing cell does, before saying ready: the first one
    parses IPython's interactiveshell.py (for the run_code frame), ~0.6 s under TCG, which a VM
    snapshot taken later then already holds. run_code leaves execution_count and history alone."""
    coro = shell.run_code(compile("raise RuntimeError('warm-up')", "<shoal-warm-up>", "exec"))
    with contextlib.suppress(StopIteration):
        coro.send(None)  # a coroutine since IPython 7, with nothing to await here
    RICH.reset(0, 0)


def warm_paths(shell) -> None:
    """Run the paths of a typical small cell once, on throwaway inputs: parse and compile, run,
    format a value for the result, encode the reply. A restored snapshot has the interpreter's
    state but not QEMU's translations of its code, so without this the session's first cell
    that returns a value costs ~20 ms more than the next ones. Nothing the user sees changes:
    no execution count, history, `_` or variable."""
    try:
        compiled = compile_fresh(shell, "w = 1\nw += 1\nw", "<shoal-warm-up>")
        if compiled is not None:
            exec(compiled[0], {})
        shell.display_formatter.format("text")
        result = shell.display_formatter.format(12345)[0]
        RICH.reset(P.DEFAULT_RICH_OUTPUT_BYTES, P.DEFAULT_MAX_OUTPUT)
        RICH.set_result(result)
        encode_reply(
            {"op": "done", "status": "ok", "result": RICH.result, "outputs": [], "error": None}
        )
        RICH.reset(0, 0)
    except Exception:  # a warm-up must never cost the session
        pass


def reseed(seed: bytes) -> None:
    """New seeds for the generators a restored snapshot would otherwise share with its siblings."""
    import random

    random.seed(seed + os.urandom(32))
    np = sys.modules.get("numpy")
    if np is not None:
        try:
            words = hashlib.sha256(b"numpy" + seed + os.urandom(32)).digest()
            np.random.seed([int.from_bytes(words[i : i + 4], "little") for i in range(0, 32, 4)])
        except Exception:
            pass
    tempfile = sys.modules.get("tempfile")
    if tempfile is not None:
        tempfile._name_sequence = None  # recreated from the reseeded random on next use


def main() -> None:
    signal.signal(signal.SIGINT, INTERRUPTS.handler)
    INTERRUPTS.attach(int(os.environ.pop("SHOAL_INTERRUPT_FD")))
    fd = int(os.environ.pop("SHOAL_KERNEL_FD"))
    link = AgentLink(fd)
    # User code must not import the agent's modules by accident: drop this directory from the path.
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]
    sys.meta_path.append(_BackendFinder())
    os.environ.setdefault("MPLBACKEND", "module://" + MPL_BACKEND_MODULE)
    shell = make_shell()
    # Entered for good (run_cell nests inside): `get_ipython` in builtins, IPython's exit/quit.
    shell.builtin_trap.__enter__()
    warm_up(shell)
    FLUSHER.start()
    import IPython

    link.send(
        encode_message(
            {
                "op": "ready",
                "pid": os.getpid(),
                "python": ".".join(map(str, sys.version_info[:3])),
                "ipython": IPython.__version__,
            }
        )
    )
    while True:
        try:
            message = link.recv()
        except KeyboardInterrupt:
            continue
        if message is None:
            return  # the agent went away
        op = message.get("op")
        if op == "execute":
            received = time.monotonic()
            reply = execute(shell, message)
            reply["kernel_at"] = [received, time.monotonic()]
            link.send(frame(encode_reply(reply)))
            if shell.exit_now:
                _flush_std()
                os._exit(0)
        elif op == "reseed":  # right after a snapshot restore
            reseed(base64.b64decode(message.get("seed", "")))
            warm_paths(shell)
