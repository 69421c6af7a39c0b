"""The Shoal instance under test: one already running (--url, --key, --admin-key), or a private
one started the way the integration tests start theirs (tests/integration/conftest.py): `shoal up
--detach` with a temporary SHOAL_HOME and free ports, stopped with `shoal down` at the end.

The private instance has a fixed instance id (`bench`), so its snapshot template (built by
its worker on first start, about a minute under TCG) is kept between runs under
SHOAL_VM_DIR/bench/templates, while its home, Redis and logs are new each time. A lock file
keeps two private benchmark runs from sharing that id at once.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from shoal.bench.core import BenchError
from shoal.ops.stack import ADMIN_KEY_FILE, DEV_KEY_FILE, free_port, healthz_at, read_admin_key
from shoal.settings import REPO_ROOT, Settings, load

INSTANCE = "bench"
HOST_NAME = "benchhost"
ONDEMAND_POOL = "bench-ondemand"  # same shape as `default` (so the same template), never warm
REFILL_POOL = "bench-refill"  # same shape, 6 ready VMs: taken at once, then timed refilling
BRIEF_POOL = "bench-brief"  # same shape, a 5 s idle cooldown: for expiry accuracy
DENSITY_POOL = "bench-density"  # same shape, capped only by the hosts: for --density
SLEEP_POOL = "bench-sleep"  # same shape, sleeps (when asked: its cooldown is an hour)
EXTRA_POOLS = (
    f"\n[pools.{ONDEMAND_POOL}]\nready_target = 0\n"
    f"\n[pools.{REFILL_POOL}]\nready_target = 6\n"
    f"\n[pools.{BRIEF_POOL}]\nready_target = 0\ncooldown_s = 5\n"
    f"\n[pools.{DENSITY_POOL}]\nready_target = 0\nmax_sessions = 100000\n"
    f'\n[pools.{SLEEP_POOL}]\nready_target = 0\ncooldown_s = 3600\non_idle = "sleep"\n'
)
UP_TIMEOUT_S = 900
TEMPLATE_TIMEOUT_S = 600
LOCK_FILE = Path(tempfile.gettempdir()) / "shoal-bench.lock"


@dataclass
class Target:
    url: str
    key: str
    settings: Settings
    private: bool
    env: dict[str, str] | None = None
    admin_key: str = ""  # for /healthz's details (templates, accelerator)
    _lock_fd: int | None = None

    def stop(self, keep_home: bool = False) -> str:
        """Stop a private instance (nothing for one given by URL); what `down` said."""
        if not self.private or self.env is None:
            return ""
        down = subprocess.run(
            [sys.executable, "-m", "shoal.ops.cli", "down"],
            env=self.env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        if not keep_home:
            shutil.rmtree(self.settings.home, ignore_errors=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        return (down.stdout + down.stderr).strip()


def _pools_file(home: Path, given: str) -> str:
    """The instance's pools (the repository's pools.toml, or SHOAL_POOLS_FILE) plus the
    benchmark's own pools of the default shape (EXTRA_POOLS)."""
    source = Path(given) if given else REPO_ROOT / "pools.toml"
    text = source.read_text() if source.exists() else ""
    path = home / "pools.toml"
    path.write_text(text + EXTRA_POOLS)
    return str(path)


def start_private(progress) -> Target:
    fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise BenchError(f"another `shoal bench` run holds {LOCK_FILE}") from None
    home = tempfile.mkdtemp(prefix="shoal-bench-home-")
    port = free_port()
    env = {
        **os.environ,
        "SHOAL_HOME": home,
        "SHOAL_PORT": str(port),
        "SHOAL_TLS_PORT": "0",
        "SHOAL_INSTANCE": INSTANCE,
        "SHOAL_HOST_NAME": HOST_NAME,
    }
    env.pop("SHOAL_REDIS_URL", None)
    env["SHOAL_POOLS_FILE"] = _pools_file(Path(home), os.environ.get("SHOAL_POOLS_FILE", ""))
    progress(f"starting a private Shoal (SHOAL_HOME={home}, port {port})")
    started = time.monotonic()
    up = subprocess.run(
        [sys.executable, "-m", "shoal.ops.cli", "up", "--detach"],
        env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=UP_TIMEOUT_S,
    )  # fmt: skip
    target = Target(f"http://127.0.0.1:{port}", "", load(env), True, env, fd)
    if up.returncode != 0:
        target.stop()
        raise BenchError("`shoal up` failed:\n" + (up.stdout + up.stderr)[-3000:])
    target.key = (Path(home) / DEV_KEY_FILE).read_text().strip()
    target.admin_key = read_admin_key(target.settings)
    lift_tenant_limits(env)
    progress(f"private Shoal up in {time.monotonic() - started:.0f} s at {target.url}")
    return target


# The benchmark measures capacity, not the fair-share bounds: its tenant (`dev`) gets limits
# no scenario reaches. Against an instance given by --url, the operator does the same with
# these commands (docs/performance.md).
BENCH_TENANT_LIMITS = (
    ("keys", "limits", "--tenant", "dev", "--rate", "100000", "--burst", "100000",
     "--max-waits", "1000", "--max-pending", "10000", "--max-session-pending", "1000",
     "--max-redis-mib", "100000"),
    ("keys", "max-sessions", "--tenant", "dev", "1000"),
)  # fmt: skip


def lift_tenant_limits(env: dict[str, str]) -> None:
    for args in BENCH_TENANT_LIMITS:
        done = subprocess.run(
            [sys.executable, "-m", "shoal.ops.cli", *args],
            env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if done.returncode != 0:
            raise BenchError(f"`shoal {' '.join(args)}` failed: {done.stderr[-1000:]}")


def external(url: str, key: str, home: str, admin_key: str = "") -> Target:
    environ = dict(os.environ)
    if home:
        environ["SHOAL_HOME"] = home
    settings = load(environ)
    if not key:
        path = Path(settings.home) / DEV_KEY_FILE
        try:
            key = path.read_text().strip()
        except OSError:
            raise BenchError(f"pass --key (no {path})") from None
    admin_key = admin_key or read_admin_key(settings)
    if not admin_key:
        path = Path(settings.home) / ADMIN_KEY_FILE
        raise BenchError(f"pass --admin-key (no {path}): /healthz's details need one")
    return Target(url.rstrip("/"), key, settings, False, admin_key=admin_key)


def templates_of(report: dict) -> dict[str, dict]:
    found = {}
    for worker in report.get("workers", {}).values():
        found.update(worker.get("libvirt", {}).get("templates", {}) or {})
    return found


def wait_ready(url: str, admin_key: str, progress, timeout_s: float = TEMPLATE_TIMEOUT_S) -> dict:
    """Wait for /healthz 200 and a ready snapshot template (else sessions cold boot); the
    templates are in /healthz's admin view."""
    deadline = time.monotonic() + timeout_s
    said = 0.0
    while True:
        status, report = healthz_at(url, admin_key)  # the same check `shoal up` waits on
        states = {v.get("state") for v in templates_of(report).values()}
        if status == 200 and "ready" in states:
            return report
        if "failed" in states and "building" not in states and "ready" not in states:
            raise BenchError(f"the snapshot template failed: {templates_of(report)}")
        if time.monotonic() > deadline:
            raise BenchError(
                f"no ready snapshot template after {timeout_s:.0f} s "
                f"(/healthz {status}: {json.dumps(report)[:500]})"
            )
        if time.monotonic() - said > 15:
            progress(f"waiting for the snapshot template (/healthz {status}, {states or '-'})")
            said = time.monotonic()
        time.sleep(1)
