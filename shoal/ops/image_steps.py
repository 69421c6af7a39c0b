"""The steps of one image build: progress lines, one log file, subprocesses that can be killed.

The builder runs its commands through `Build` (a few short ones aside), so a failure names its
step and carries the tail of its output, and a long step prints a progress line at least every
HEARTBEAT_S.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from shoal.images import ImageBuildError

HEARTBEAT_S = 10.0  # a progress line at least this often during long steps

Progress = Callable[[str], None]


class Build:
    """Progress reporting and subprocess running for one build, with one log file."""

    def __init__(self, name: str, progress: Progress, log_path: Path) -> None:
        self.name = name
        self.progress = progress
        self.log_path = log_path
        self.t0 = time.monotonic()
        self.timings: dict[str, float] = {}

    def say(self, msg: str) -> None:
        self.progress(f"[image {self.name} {time.monotonic() - self.t0:6.1f}s] {msg}")

    def log(self, text: str) -> None:
        with self.log_path.open("a") as f:
            f.write(text if text.endswith("\n") else text + "\n")

    @contextlib.contextmanager
    def step(self, step: str) -> Iterator[None]:
        self.say(f"{step} ...")
        self.log(f"=== {step}")
        t = time.monotonic()
        try:
            yield
        except ImageBuildError:
            raise
        except Exception as exc:  # an OSError, a parse error: name the step it happened in
            raise ImageBuildError(step, f"{type(exc).__name__}: {exc}", self.tail()) from exc
        took = time.monotonic() - t
        self.timings[step] = round(took, 1)
        self.say(f"{step} done in {took:.1f}s")

    def tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def run(self, step: str, argv: list[str], *, cwd: Path | None = None) -> str:
        """Run argv, its output going to the log; a line every HEARTBEAT_S; raise on failure."""
        self.log("$ " + " ".join(argv))
        start = self.log_path.stat().st_size if self.log_path.exists() else 0
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", LC_ALL="C.UTF-8")
        with self.log_path.open("ab") as out:
            try:
                # Own process group: an interrupted build kills debootstrap's dpkg/chroot too.
                proc = subprocess.Popen(
                    argv,
                    cwd=cwd,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
            except OSError as exc:
                raise ImageBuildError(step, f"cannot run {argv[0]}: {exc}") from None
            t = time.monotonic()
            next_beat = t + HEARTBEAT_S
            try:
                while True:
                    try:
                        rc = proc.wait(timeout=1.0)
                        break
                    except subprocess.TimeoutExpired:
                        pass
                    if time.monotonic() >= next_beat:
                        next_beat += HEARTBEAT_S
                        last = self.tail(1).strip()[:100]
                        self.say(f"{step}: {time.monotonic() - t:.0f}s ... {last}")
            except BaseException:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise
        with self.log_path.open("rb") as f:
            f.seek(start)
            output = f.read().decode(errors="replace")
        if rc != 0:
            raise ImageBuildError(step, f"{argv[0]} exited with status {rc}", self.tail())
        return output
