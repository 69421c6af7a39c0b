"""The interpreter process ("kernel") that the agent supervises: runs user code with IPython.

Started by the agent (supervisor.py) as the sandbox user with cwd = the data directory:

    python3 kernel.py          (environment: SHOAL_KERNEL_FD, MPLBACKEND, MPLCONFIGDIR, ...)

kernel.py only imports this module (so the byte-code compiled at image build time is used).

- fd 0 is /dev/null; fds 1 and 2 are pipes the agent reads and caps (so output of
  subprocesses and C code is captured as well as print()).
- SHOAL_KERNEL_FD is a socket to the agent carrying length-prefixed JSON messages
  (4-byte big-endian length, then a JSON object):
    agent -> kernel  {"op": "execute", "id": n, "code": str, "max_rich": int}
                     {"op": "reseed", "seed": base64}
    kernel -> agent  {"op": "ready", "pid": int, "ipython": str}
                     {"op": "done", "id": n, "status": "ok"|"error", "result", "outputs",
                      "outputs_truncated", "error", "execution_count",
                      "kernel_at": [received, replied] (time.monotonic(), for the phases)}
  The kernel runs user code, so the agent treats everything it says as untrusted.
- SHOAL_INTERRUPT_FD is a shared 8-byte memfd: the agent writes an execution id there before it
  sends SIGINT, and KeyboardInterrupt is raised only in that execution's cell (see Interrupts).

Standard library plus IPython; matplotlib only when the user imports it.
"""

from __future__ import annotations

import ast
import base64
import contextlib
import hashlib
import importlib.abc
import importlib.util
import json
import mmap
import os
import re
import signal
import socket
import struct
import sys
import threading
import time
import types

from traitlets import All  # IPython's own dependency; it reads nothing from the environment

HERE = os.path.dirname(os.path.abspath(__file__))
LENGTH = struct.Struct(">I")
MAX_COMMAND = 8 << 20
RECV_SIZE = 64 << 10  # under malloc's mmap threshold: recv(n) allocates n bytes each call
MAX_REPLY = 28 << 20
FLUSH_INTERVAL_S = 0.1
FLUSH_LINGER_S = 2.0  # the agent kills a kernel whose message is over 30 MiB
MPL_BACKEND_MODULE = "shoal_mpl_backend"
RICH_MIMES = (
    "text/plain",
    "text/html",
    "text/markdown",
    "text/latex",
    "application/json",
    "image/png",
    "image/jpeg",
    "image/svg+xml",
)
BINARY_MIMES = ("image/png", "image/jpeg")
MAX_ERROR_VALUE = 16 << 10
MAX_TRACEBACK = 256 << 10
ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")


def strip_ansi(text: str) -> str:
    return ANSI_RE.sub("", text)


def clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    half = limit // 2
    return text[:half] + "\n... [truncated] ...\n" + text[-half:]


class AgentLink:
    """Length-prefixed JSON over the socket inherited from the agent."""

    def __init__(self, fd: int):
        self.sock = socket.socket(fileno=fd)
        self.sock.set_inheritable(False)
        self.sock.setblocking(True)
        self.buf = bytearray()

    def recv(self) -> dict | None:
        """The next message; None when the agent went away. One recv() usually brings a
        whole message (each syscall counts under TCG)."""
        buf = self.buf
        while True:
            if len(buf) >= LENGTH.size:
                (length,) = LENGTH.unpack_from(buf)
                if length > MAX_COMMAND:
                    raise SystemExit(f"kernel: command of {length} bytes from the agent")
                end = LENGTH.size + length
                if len(buf) >= end:
                    body = bytes(buf[LENGTH.size : end])
                    del buf[:end]
                    return json.loads(body)
            data = self.sock.recv(RECV_SIZE)
            if not data:
                return None
            buf += data

    def send(self, message: dict | bytes) -> None:
        body = message if isinstance(message, bytes) else encode(message)
        self.sock.sendall(LENGTH.pack(len(body)) + body)


def encode(message: dict) -> bytes:
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False, default=str).encode()


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
        reply.update(result=None, outputs=[], outputs_truncated=True)
        body = encode(reply)
    return body


class RichOutput:
    """Result and display outputs of the running cell, bounded in total size."""

    def __init__(self) -> None:
        self.reset(0)

    def reset(self, budget: int) -> None:
        self.budget = budget
        self.used = 0
        self.result: dict | None = None
        self.outputs: list[dict] = []
        self.truncated = False
        self.traceback: str | None = None

    def _take(self, data: dict) -> dict | None:
        bundle = clean_bundle(data)
        if not bundle:
            return None
        size = sum(
            len(v.encode()) if isinstance(v, str) else len(encode(v)) for v in bundle.values()
        )
        if self.used + size > self.budget:
            self.truncated = True
            return None
        self.used += size
        return bundle

    def set_result(self, data: dict) -> None:
        bundle = self._take(data)
        if bundle is not None:
            self.result = bundle

    def add_display(self, data: dict) -> None:
        bundle = self._take(data)
        if bundle is not None:
            self.outputs.append({"type": "display", "data": bundle})

    def clear(self) -> None:
        self.outputs.clear()
        self.used = 0
        if self.result is not None:
            self.used = sum(len(v) if isinstance(v, str) else 0 for v in self.result.values())


def clean_bundle(data: dict) -> dict:
    """Keep the MIME types the protocol carries, as JSON-safe values (images base64)."""
    bundle = {}
    for mime in RICH_MIMES:
        if mime not in data:
            continue
        value = data[mime]
        if isinstance(value, bytes | bytearray):
            if mime in BINARY_MIMES:
                value = base64.b64encode(value).decode("ascii")
            else:
                value = bytes(value).decode("utf-8", "replace")
        if mime == "application/json":
            try:
                json.dumps(value)
            except (TypeError, ValueError):
                continue
        elif not isinstance(value, str):
            continue
        bundle[mime] = value
    return bundle


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
    RICH.reset(int(message.get("max_rich", 16 << 20)))
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
            "name": name,
            "value": clip(value, MAX_ERROR_VALUE),
            "traceback": clip(RICH.traceback or f"{name}: {value}", MAX_TRACEBACK),
        }
    return {
        "op": "done",
        "id": message.get("id"),
        "status": status,
        "result": RICH.result,
        "outputs": RICH.outputs,
        "outputs_truncated": RICH.truncated,
        "error": error,
        "execution_count": shell.execution_count - 1,
        "exiting": bool(shell.exit_now),  # exit() was called: this process ends after replying
    }


_ASYNC_NODES = (ast.Await, ast.AsyncFor, ast.AsyncWith)
# Cells run again verbatim (a retried call, a polling loop, a re-run notebook cell) skip parsing
# and compiling: under TCG that is about half of a small cell's time in the interpreter.
COMPILED_CELLS = 64
COMPILED: dict[tuple[str, int], tuple] = {}


def run_cell_fast(shell, code: str):
    """Run a plain-Python cell the way `shell.run_cell` would, with far less machinery.

    Under TCG every step of IPython's run_cell costs tens to hundreds of microseconds, and after
    the context switch from the agent each one costs about three times its hot-loop time: the
    tokenizer-based input transformers, the async checks, a compile per statement, the trap
    context managers. IPython only transforms text that is not valid Python (magics, `!cmd`,
    `x?`, prompts, leading indentation), so a cell that parses and compiles as Python, with no
    await, runs here through the steps that matter: the same events, input history (`In`,
    `_i`), displayhook for the last expression (`_`, `Out`), run_code's exception handling and
    tracebacks, and the execution count. Anything else, or a shell with extra transformers,
    returns None: the caller uses run_cell.
    """
    if shell.ast_transformers or shell.input_transformers_post:
        return None
    compiled = _compile_cell(shell, code)
    if compiled is None:
        return None
    body, last = compiled
    from IPython.core.interactiveshell import ExecutionInfo, ExecutionResult

    info = ExecutionInfo(code, True, False, True, None)
    result = ExecutionResult(info)
    _set_quietly(shell.displayhook, exec_result=result)
    shell.events.trigger("pre_execute")
    shell.events.trigger("pre_run_cell", info)
    _store_input(shell, code)
    hook, sys.displayhook = sys.displayhook, shell.displayhook
    try:
        failed = body is not None and _run_compiled(shell, body, result)
        if last is not None and not failed:
            _run_compiled(shell, last, result)
    finally:
        sys.displayhook = hook
    _set_quietly(shell.displayhook, exec_result=None)
    _set_quietly(
        shell,
        last_execution_succeeded=result.error_in_exec is None,
        last_execution_result=result,
        execution_count=shell.execution_count + 1,
    )
    shell.events.trigger("post_execute")
    shell.events.trigger("post_run_cell", result)
    return result


def _compile_cell(shell, code: str):
    """(statements, last expression) compiled as IPython's "last_expr" interactivity does (the
    last expression in "single" mode, which calls the displayhook), or None for run_cell."""
    name = shell.compile.cache(code, shell.execution_count, raw_code=code)
    key = (code, shell.compile.flags)  # `from __future__` imports change how code compiles
    compiled = COMPILED.pop(key, None)
    if compiled is None:
        compiled = _compile_fresh(shell, code, name)
        if compiled is None:
            return None
    body, last = compiled
    if _cacheable(body) and _cacheable(last):
        COMPILED[key] = compiled  # most recently used last
        if len(COMPILED) > COMPILED_CELLS:
            del COMPILED[next(iter(COMPILED))]
    # The traceback of this run names this cell ("Cell In[n]"), not the one compiled first.
    return (
        body.replace(co_filename=name) if body is not None else None,
        last.replace(co_filename=name) if last is not None else None,
    )


def _compile_fresh(shell, code: str, name: str):
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None
    if ("await" in code or "async" in code) and any(
        isinstance(node, _ASYNC_NODES) for node in ast.walk(tree)
    ):
        return None
    nodes = tree.body
    last = nodes.pop() if nodes and isinstance(nodes[-1], ast.Expr) else None
    try:
        body = shell.compile(ast.Module(nodes, []), name, "exec") if nodes else None
        tail = shell.compile(ast.Interactive([last]), name, "single") if last else None
    except Exception:  # e.g. `return` outside a function: run_cell reports it as IPython does
        return None
    return body, tail


def _cacheable(code_obj) -> bool:
    """Code with no nested code object (function, lambda, class, comprehension): re-stamping
    its file name is then exact for tracebacks."""
    return code_obj is None or not any(isinstance(c, types.CodeType) for c in code_obj.co_consts)


def _run_compiled(shell, code_obj, result) -> bool:
    """shell.run_code to its end (a coroutine with nothing to await); True when it raised."""
    runner = shell.run_code(code_obj, result)
    try:
        runner.send(None)
    except StopIteration as finished:
        return bool(finished.value)
    runner.close()
    raise RuntimeError("a cell without await awaited")


def _set_quietly(obj, **values) -> None:
    """Set traitlets attributes without their machinery when nothing observes or validates
    them: under TCG a trait assignment (validation, cross-validation, change notification)
    costs ~0.1 ms, and a cell made nine. The values set here are of the traits' own types."""
    for name, value in values.items():
        if _unwatched(obj, name):
            obj._trait_values[name] = value
        else:
            setattr(obj, name, value)


def _unwatched(obj, name: str) -> bool:
    """The trait has a value already and no observer or cross-validator (traitlets 5)."""
    store = getattr(obj, "_trait_values", None)
    notifiers = getattr(obj, "_trait_notifiers", None)
    validators = getattr(obj, "_trait_validators", None)
    if store is None or notifiers is None or validators is None or name not in store:
        return False
    observers = [*(notifiers.get(name) or {}).values(), *(notifiers.get(All) or {}).values()]
    return not any(observers) and name not in validators


def _store_input(shell, code: str) -> None:
    """What HistoryManager.store_inputs does with history off (In, _ih, _i, _ii, _iii, _iN),
    without its trait assignments or the database cache nothing would ever save."""
    history = shell.history_manager
    count = shell.execution_count
    if history.enabled or not hasattr(history, "_exit_re"):
        history.store_inputs(count, code, code)
        return
    source = code.rstrip("\n")
    if history._exit_re.match(source.strip()):
        return
    history.input_hist_parsed.append(source)
    history.input_hist_raw.append(source)
    previous = history._i00
    _set_quietly(history, _iii=history._ii, _ii=history._i, _i=previous, _i00=source)
    shell.push(
        {"_i": previous, "_ii": history._ii, "_iii": history._iii, f"_i{count}": source},
        interactive=False,
    )


def warm_up(shell) -> None:
    """Format one traceback the way a failing cell does, before saying ready: the first one
    parses IPython's interactiveshell.py (for the run_code frame), ~0.6 s under TCG, which a VM
    snapshot taken later then already holds. run_code leaves execution_count and history alone."""
    coro = shell.run_code(compile("raise RuntimeError('warm-up')", "<shoal-warm-up>", "exec"))
    with contextlib.suppress(StopIteration):
        coro.send(None)  # a coroutine since IPython 7, with nothing to await here
    RICH.reset(0)


def warm_paths(shell) -> None:
    """Run the paths of a typical small cell once, on throwaway inputs: parse and compile, run,
    format a value for the result, encode the reply. A restored snapshot has the interpreter's
    state but not QEMU's translations of its code, so without this the session's first cell
    that returns a value costs ~20 ms more than the next ones. Nothing the user sees changes:
    no execution count, history, `_` or variable."""
    try:
        compiled = _compile_fresh(shell, "w = 1\nw += 1\nw", "<shoal-warm-up>")
        if compiled is not None:
            exec(compiled[0], {})
        shell.display_formatter.format("text")
        result = shell.display_formatter.format(12345)[0]
        encode_reply({"op": "done", "status": "ok", "result": result, "outputs": [], "error": None})
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
        {
            "op": "ready",
            "pid": os.getpid(),
            "python": ".".join(map(str, sys.version_info[:3])),
            "ipython": IPython.__version__,
        }
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
            link.send(encode_reply(reply))
            if shell.exit_now:
                _flush_std()
                os._exit(0)
        elif op == "reseed":  # right after a snapshot restore
            reseed(base64.b64decode(message.get("seed", "")))
            warm_paths(shell)
