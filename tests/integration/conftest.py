"""A real Shoal instance for the integration tests: private Redis, real Celery worker and beat,
libvirtd, QEMU guests and the API under gunicorn, started with `shoal up --detach` under a
temporary SHOAL_HOME (so its VM names never clash with a running `./scripts/up`) and stopped
with `shoal down` at the end."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from shoal.ops import processes
from shoal.ops.stack import free_port
from shoal.settings import load

REPO = Path(__file__).resolve().parents[2]
SHOAL = [sys.executable, "-m", "shoal.ops.cli"]


@dataclass
class Stack:
    url: str
    tls_url: str
    key: str
    env: dict[str, str]
    home: Path
    up_output: str = ""

    def headers(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.key}"}

    @property
    def admin_key(self) -> str:
        """The instance's admin key, kept by `shoal up` (/healthz's details, /metrics)."""
        return (self.home / "admin-api-key").read_text().strip()

    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_key}"}

    def shoal(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*SHOAL, *args], env=self.env, cwd=REPO, capture_output=True, text=True, check=check
        )

    def new_key(self, tenant: str) -> str:
        return self.shoal("keys", "create", "--tenant", tenant).stdout.split()[0]

    def new_session(self, key: str | None = None, pool: str = "default") -> str:
        response = requests.post(
            f"{self.url}/v1/sessions", json={"pool": pool}, headers=self.headers(key), timeout=180
        )
        assert response.status_code == 201, response.text
        return response.json()["id"]

    def execute(self, session_id: str, code: str, key: str | None = None, **body) -> dict:
        response = requests.post(
            f"{self.url}/v1/sessions/{session_id}/executions",
            json={"code": code, **body},
            headers=self.headers(key),
            timeout=300,
        )
        assert response.status_code in (200, 202), response.text
        return response.json()


def start_stack(home: Path, overrides: dict[str, str] | None = None) -> Stack:
    """`shoal up --detach` for a new instance at `home` (fresh ports), with `overrides` on top
    of the test settings; stop it with stop_stack."""
    port, tls_port = free_port(), free_port()
    env = {
        **os.environ,
        "SHOAL_HOME": str(home),
        "SHOAL_PORT": str(port),
        "SHOAL_TLS_PORT": str(tls_port),
        "SHOAL_HOST_NAME": "testhost",
        "SHOAL_HEARTBEAT_S": "1",
        "SHOAL_HEARTBEAT_TTL_S": "5",
        "SHOAL_POOLS_FILE": str(REPO / "tests" / "integration" / "pools.toml"),
        # Webhook tests: a receiver on loopback, and retries within seconds, not an hour.
        "SHOAL_WEBHOOK_ALLOW_HOSTS": "127.0.0.1",
        "SHOAL_WEBHOOK_RETRY_FIRST_S": "0.5",
        "SHOAL_WEBHOOK_RETRY_MAX_S": "2",
        "SHOAL_WEBHOOK_RETRY_WINDOW_S": "30",
        "SHOAL_WEBHOOK_TIMEOUT_S": "3",
        # Few worker threads, so a flood of queued executions outnumbers them
        # (test_noisy_neighbour.py): waiting executions must hold none.
        "SHOAL_WORKER_CONCURRENCY": "12",
        **(overrides or {}),
    }
    env.pop("SHOAL_REDIS_URL", None)
    up = subprocess.run(
        [*SHOAL, "up", "--detach"], env=env, cwd=REPO, capture_output=True, text=True
    )
    if up.returncode != 0:
        subprocess.run([*SHOAL, "down"], env=env, cwd=REPO, capture_output=True)
        pytest.fail(
            "Shoal did not start (QEMU/libvirt guests are required here):\n" + up.stdout + up.stderr
        )
    key = (home / "dev-api-key").read_text().strip()
    return Stack(
        f"http://127.0.0.1:{port}", f"https://127.0.0.1:{tls_port}", key, env, home, up.stdout
    )


def stop_stack(stack: Stack) -> None:
    """`shoal down`, then prove nothing of the instance is left; its templates are removed."""
    down = subprocess.run([*SHOAL, "down"], env=stack.env, cwd=REPO, capture_output=True, text=True)
    assert down.returncode == 0, down.stdout + down.stderr
    settings = load(stack.env)
    assert_nothing_left(settings)
    # The instance's snapshot templates (~250 MB) belong to this run alone.
    shutil.rmtree(settings.instance_vm_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Stack:
    started = start_stack(tmp_path_factory.mktemp("shoal-home"))
    yield started
    stop_stack(started)


def processes_of(home: str) -> list[int]:
    """Live processes started for the instance at `home` (they carry SHOAL_HOME=home)."""
    marker = f"SHOAL_HOME={home}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in environ and processes.alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def domain_names() -> list[str]:
    """Every libvirt domain's name, running or not."""
    return subprocess.run(
        ["virsh", "-c", "qemu:///system", "list", "--all", "--name"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()


def assert_nothing_left(settings) -> None:
    """After `shoal down`: no domain of this instance, no VM file, no Shoal process."""
    names = domain_names()
    prefix = f"shoal-{settings.instance_id}-"
    assert [n for n in names if n.startswith(prefix)] == []
    assert processes_of(settings.home) == [], "Shoal processes still run after `shoal down`"
    leftovers = [
        p for p in settings.instance_vm_dir.rglob("*")
        if p.is_file() and "templates" not in p.parts
    ]  # fmt: skip
    assert leftovers == [], f"VM files left behind: {leftovers[:5]}"
