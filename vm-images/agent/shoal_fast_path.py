"""The interpreter's fast path for plain-Python cells (run_cell_fast), with its compiled-code cache.

Under TCG each step of IPython's run_cell costs tens to hundreds of microseconds; shoal_kernel.py
tries this path first for every cell and uses run_cell when it returns None. It is a module of its
own because it is the part of the interpreter that reaches into IPython's and traitlets'
internals (what run_cell would do, step by step), which is what a new IPython may break.
The shoal_ prefix: it stays in the user's sys.modules.
"""

from __future__ import annotations

import ast
import sys
import types

from traitlets import All  # IPython's own dependency; it reads nothing from the environment

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
        compiled = compile_fresh(shell, code, name)
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


def compile_fresh(shell, code: str, name: str):
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
