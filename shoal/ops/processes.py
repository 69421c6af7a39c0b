"""Background processes that `shoal up` starts: pid files, logs, liveness, stopping.

Each component runs in its own process group, logs to SHOAL_HOME/logs/<name>.log and records
its pid in SHOAL_HOME/run/<name>.pid, so `shoal down` (or a second `shoal up`) can find it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

from shoal.settings import Settings


def pid_file(settings: Settings, name: str) -> Path:
    return settings.run_dir / f"{name}.pid"


def log_file(settings: Settings, name: str) -> Path:
    return settings.logs_dir / f"{name}.log"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def running_pid(settings: Settings, name: str) -> int | None:
    try:
        pid = int(pid_file(settings, name).read_text())
    except (FileNotFoundError, ValueError):
        return None
    return pid if alive(pid) else None


def start(settings: Settings, name: str, argv: list[str], env: dict | None = None) -> int:
    """Start `argv` in its own process group with its output in the component's log."""
    settings.logs_dir.mkdir(parents=True, exist_ok=True)
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    with open(log_file(settings, name), "ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {name}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
    pid_file(settings, name).write_text(str(proc.pid))
    return proc.pid


def stop(settings: Settings, name: str, timeout_s: float = 15.0) -> bool:
    """Stop a component and its process group; True when one was running."""
    pid = running_pid(settings, name)
    pid_file(settings, name).unlink(missing_ok=True)
    if pid is None:
        return False
    _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    _signal_group(pid, signal.SIGKILL)
    return True


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return f"(no log at {path})"
