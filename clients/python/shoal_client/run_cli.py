"""`shoal-run script.py [--files in.csv] [--collect 'out/*']`: run a local file in a fresh
session, print what it printed, bring matching files back, delete the session. Exits 0 when the
code succeeded, 1 when it failed (raised, timed out, exit code not 0), 2 on a usage or API
error."""

from __future__ import annotations

import argparse
import fnmatch
import sys
import time
from pathlib import Path, PurePosixPath

import httpx

from shoal_client.client import Client, Session
from shoal_client.errors import ShoalError
from shoal_client.models import Execution

PROGRESS_AFTER_S = 3.0
PROGRESS_EVERY_S = 5.0
POLL_S = 0.25


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shoal-run", description=__doc__.split("\n\n")[0])
    p.add_argument("script", type=Path, help="the file to run (.sh runs as a shell script)")
    p.add_argument("--files", nargs="*", default=[], type=Path,
                   help="local files to upload to /mnt/data first (by their names)")  # fmt: skip
    p.add_argument("--collect", nargs="*", default=[],
                   help="globs of /mnt/data paths to download afterwards")  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("."), help="where collected files go")
    p.add_argument("--pool", default="default")
    p.add_argument("--timeout", type=float, default=120,
                   help="seconds the code may run (the server allows up to 220)")  # fmt: skip
    p.add_argument("--shell", action="store_true", help="run as a shell script")
    p.add_argument("--url", help="Shoal's URL (default: SHOAL_URL)")
    p.add_argument("--key", help="API key (default: SHOAL_API_KEY)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        code = args.script.read_text()
        for path in args.files:
            if not path.is_file():
                raise FileNotFoundError(f"no local file {path}")
    except (OSError, ValueError) as exc:  # ValueError: a script that is not text
        print(f"shoal-run: {exc}", file=sys.stderr)
        return 2
    language = "shell" if args.shell or args.script.suffix == ".sh" else "python"
    try:
        with Client(args.url, args.key) as client, client.session(args.pool) as session:
            for path in args.files:
                session.files.upload(path.name, path)
            execution = _run(client, session, code, language, args.timeout)
            _print(execution)
            for name in collect(session, args.collect, args.out):
                print(f"shoal-run: collected {name}", file=sys.stderr)
    except (ShoalError, OSError, httpx.HTTPError) as exc:  # OSError: a short download, say
        print(f"shoal-run: {exc}", file=sys.stderr)
        return 2
    return 0 if execution.status == "succeeded" else 1


def _run(client: Client, session: Session, code: str, language: str, timeout: float):
    execution = session.submit(code, language=language, timeout_s=timeout)
    started = last = time.monotonic()
    while not execution.done:
        time.sleep(POLL_S)
        execution = client.get_execution(execution.id)
        now = time.monotonic()
        if now - started >= PROGRESS_AFTER_S and now - last >= PROGRESS_EVERY_S:
            print(f"shoal-run: {execution.status} for {now - started:.0f} s "
                  f"(session {session.id})", file=sys.stderr)  # fmt: skip
            last = now
    return execution


def _print(execution: Execution) -> None:
    sys.stdout.write(execution.stdout)
    sys.stderr.write(execution.stderr)
    if execution.text is not None:
        print(execution.text)
    if execution.error:
        print(execution.error.get("traceback") or execution.error, file=sys.stderr)
    if execution.status != "succeeded":
        print(f"shoal-run: the code ended {execution.status}", file=sys.stderr)


def collect(session: Session, globs: list[str], out: Path) -> list[str]:
    """Download the session's files matching any glob into `out`, keeping their relative
    paths; a listed path that would leave `out` is refused."""
    if not globs:
        return []
    names = []
    for entry in session.files.list(recursive=True):
        if entry.type != "file" or not any(fnmatch.fnmatch(entry.path, g) for g in globs):
            continue
        target = safe_target(out, entry.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        session.files.download_to(entry.path, target)
        names.append(entry.path)
    return names


def safe_target(out: Path, listed: str) -> Path:
    """Where a listed file goes under `out`; a path the session listed that would land
    anywhere else (absolute, `..`, a backslash, a drive on Windows) is refused."""
    relative = PurePosixPath(listed)
    parts = relative.parts
    if not parts or relative.is_absolute() or any(p in ("", ".", "..") or "\\" in p for p in parts):
        raise ShoalError("UnsafePath", f"the session listed {listed!r}: not collected")
    target = out.joinpath(*parts)
    if not target.resolve().is_relative_to(out.resolve()):
        raise ShoalError("UnsafePath", f"the session listed {listed!r}: not collected")
    return target


if __name__ == "__main__":
    sys.exit(main())
