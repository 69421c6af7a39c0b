"""`shoal up`, `shoal down`, `shoal status`: the parts of one Shoal instance on this host.

Order of start: Redis (private unless SHOAL_REDIS_URL), virtlogd and libvirtd, the guest image
(built when the cache has none for the current recipe), the worker, beat, the API over HTTP and
HTTPS. `up` waits until /healthz says every part is up, reading its details with the instance's
admin key (SHOAL_HOME/admin-api-key), and says plainly when guests run under TCG. With
SHOAL_REQUIRE_KVM=1 it refuses to start where KVM is not usable, as the worker does.
"""

from __future__ import annotations

import json
import signal
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from shoal import admin_keys, queue, redis_conn, secret_files, tenants
from shoal.celery_app import CONTROL_QUEUE
from shoal.keys import host_queue
from shoal.ops import daemons, private_redis, processes, tls
from shoal.settings import Settings

# stop order; start is reversed. `webhooks` and `batches` are Celery workers of their own
# (workers/async_app.py, docs/async.md), so deliveries and batch coordinators never take a thread
# that an execution needs.
COMPONENTS = ("api-tls", "api", "beat", "webhooks", "batches", "worker", "redis")
HEALTH_TIMEOUT_S = 240
DEV_KEY_FILE = "dev-api-key"
ADMIN_KEY_FILE = "admin-api-key"


class StartFailed(Exception):
    def __init__(self, component: str, message: str) -> None:
        super().__init__(f"{component}: {message}")
        self.component = component


def endpoint(settings: Settings) -> str:
    host = "127.0.0.1" if settings.bind in ("0.0.0.0", "") else settings.bind
    return f"http://{host}:{settings.port}"


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _say(message: str) -> None:
    print(f"shoal: {message}", flush=True)


def start_redis(settings: Settings) -> None:
    """Start the private Redis (unless SHOAL_REDIS_URL names one): loopback only, a password,
    append-only, its files readable by their owner only (private_redis.py)."""
    if settings.redis_url:
        return
    url_file = redis_conn.private_url_file(settings)
    if processes.running_pid(settings, "redis") and url_file.exists():
        return
    port = private_redis.previous_port(settings) or free_port()
    conf = private_redis.write_config(settings, port)
    processes.start(settings, "redis", ["redis-server", str(conf)])
    password = private_redis.password(settings)
    secret_files.write_secret(url_file, f"redis://:{password}@127.0.0.1:{port}/0\n")
    _wait_for(lambda: _redis_ok(settings), 20, "redis", settings)


def _redis_ok(settings: Settings) -> bool:
    try:
        return bool(redis_conn.client(settings).ping())
    except Exception:
        return False


def _wait_for(check, timeout_s: float, component: str, settings: Settings) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise StartFailed(component, f"not ready after {timeout_s:.0f} s")
        if component in COMPONENTS and processes.running_pid(settings, component) is None:
            raise StartFailed(component, "exited during start-up")
        time.sleep(0.2)


def start_services(settings: Settings) -> None:
    python = sys.executable
    host = settings.host_name
    worker = [python, "-m", "celery", "-A", "workers.worker_app", "worker"]
    worker += ["-Q", f"{host_queue(host)},{CONTROL_QUEUE}", "-P", "threads"]
    worker += ["-c", str(settings.worker_threads), "-n", f"{host}@{settings.instance_id}"]
    worker += ["-l", "INFO", "--without-gossip", "--without-mingle"]
    beat = [python, "-m", "celery", "-A", "workers.worker_app", "beat"]
    beat += ["-S", "workers.beat:ShoalScheduler", "-l", "INFO"]
    # api/server.py: the worker class (gthread, errors in JSON) and gunicorn's request limits.
    gunicorn = [python, "-m", "gunicorn", "-c", "python:api.server"]
    gunicorn += ["-w", str(settings.api_workers)]
    gunicorn += ["--threads", str(settings.api_threads), "--timeout", "600"]
    gunicorn += ["--access-logfile", "-", "--error-logfile", "-"]
    asynchronous = [python, "-m", "celery", "-A", "workers.async_app", "worker", "-P", "threads"]
    asynchronous += ["-l", "INFO", "--without-gossip", "--without-mingle"]
    batches = asynchronous + ["-Q", queue.BATCH_QUEUE, "-c", str(settings.batch_concurrency)]
    batches += ["-n", f"batches-{host}@{settings.instance_id}"]
    webhooks = asynchronous + ["-Q", queue.WEBHOOK_QUEUE, "-c", str(settings.webhook_concurrency)]
    webhooks += ["-n", f"webhooks-{host}@{settings.instance_id}"]
    plan = {
        "worker": worker,
        "batches": batches,
        "webhooks": webhooks,
        "beat": beat,
        "api": gunicorn + ["-b", f"{settings.bind}:{settings.port}", "api.app:create_app()"],
    }
    if settings.tls_port:
        cert, key = tls.cert_and_key(settings)
        plan["api-tls"] = gunicorn + [
            "-b", f"{settings.bind}:{settings.tls_port}",
            "--certfile", str(cert), "--keyfile", str(key),
            "api.app:create_app()",
        ]  # fmt: skip
    for name, argv in plan.items():
        if processes.running_pid(settings, name) is None:
            processes.start(settings, name, argv)


def health(settings: Settings) -> tuple[int, dict]:
    return healthz_at(endpoint(settings), read_admin_key(settings))


def healthz_at(url: str, admin_key: str = "") -> tuple[int, dict]:
    """GET {url}/healthz: (status, report); (0, {}) when nothing answers. Without an admin key
    the report is only {"status": ...}."""
    headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
    request = urllib.request.Request(url + "/healthz", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.load(exc)
        except ValueError:
            return exc.code, {}
    except (OSError, ValueError):
        return 0, {}


def wait_healthy(settings: Settings, timeout_s: float = HEALTH_TIMEOUT_S) -> dict:
    deadline = time.monotonic() + timeout_s
    report: dict = {}
    while time.monotonic() < deadline:
        for name in ("worker", "beat", "api"):
            if processes.running_pid(settings, name) is None:
                raise StartFailed(name, "exited during start-up")
        status, report = health(settings)
        if status == 200:
            return report
        time.sleep(0.5)
    down = ", ".join(report.get("down", [])) or "the API"
    raise StartFailed(_component_of(down), f"not healthy after {timeout_s:.0f} s: down: {down}")


def _component_of(down: str) -> str:
    for name in ("worker", "beat", "libvirt"):
        if name in down:
            return "worker" if name == "libvirt" else name
    return "api"


def dev_key(settings: Settings) -> str:
    """The development API key (tenant `dev`), made once and kept in SHOAL_HOME/dev-api-key."""
    path = Path(settings.home) / DEV_KEY_FILE
    r = redis_conn.client(settings)
    if path.exists():
        key = path.read_text().strip()
        if tenants.authenticate(r, key):
            return key
    _, key = tenants.create_key(r, "dev")
    secret_files.write_secret(path, key + "\n")
    return key


def admin_key(settings: Settings) -> str:
    """The instance's admin key (shoal/admin_keys.py), made once and kept, 0600, in
    SHOAL_HOME/admin-api-key; made anew when the one there is no longer valid (revoked, or a
    new Redis)."""
    path = Path(settings.home) / ADMIN_KEY_FILE
    r = redis_conn.client(settings)
    if path.exists():
        key = secret_files.read_secret(path)
        if admin_keys.is_admin(r, key):
            return key
    _, key = admin_keys.create_admin_key(r, note=f"made by `shoal up` for {path}")
    secret_files.write_secret(path, key + "\n")
    return key


def read_admin_key(settings: Settings) -> str:
    """The admin key `up` keeps in SHOAL_HOME ("" when there is none)."""
    try:
        return secret_files.read_secret(Path(settings.home) / ADMIN_KEY_FILE)
    except OSError:
        return ""


def accelerator_lines(report: dict) -> list[str]:
    """What /healthz's admin view says about each host's accelerator, one line per host."""
    lines = []
    for host, worker in sorted(report.get("workers", {}).items()):
        accel = worker.get("accelerator")
        if not accel:
            continue
        line = f"guests on {host} run under {accel['kind'].upper()} ({accel['reason']})"
        if accel.get("warning"):
            line += f"\n  WARNING: {accel['warning']}"
        lines.append(line)
    return lines


def running(settings: Settings) -> bool:
    return processes.running_pid(settings, "api") is not None


def up(settings: Settings, detach: bool) -> int:
    if running(settings):
        _say(f"already running at {endpoint(settings)} (stop it with ./scripts/down)")
        restarted = [
            n
            for n in ("worker", "beat", "batches", "webhooks")
            if processes.running_pid(settings, n) is None
        ]
        if not settings.redis_url and processes.running_pid(settings, "redis") is None:
            start_redis(settings)  # on its port again: the running processes reconnect
            restarted.insert(0, "redis")
        if restarted:
            start_services(settings)
            _say(f"restarted {', '.join(restarted)}, which had stopped")
        return 0
    try:
        report = _bring_up(settings)
    except StartFailed as exc:
        log = processes.log_file(settings, exc.component)
        print(f"shoal: failed to start {exc}\n--- last lines of {log} ---", file=sys.stderr)
        print(processes.tail(log), file=sys.stderr)
        stop_components(settings)
        return 1
    for line in accelerator_lines(report):
        _say(line)
    key = dev_key(settings)
    _print_welcome(settings, key)
    if detach:
        return 0
    return _stay_in_foreground(settings)


def _bring_up(settings: Settings) -> dict:
    """Start every part; /healthz's admin view once all are up."""
    Path(settings.home).mkdir(parents=True, exist_ok=True)
    missing = daemons.missing_tools()
    if missing:
        raise StartFailed("up", f"missing programs {missing}: run ./scripts/up to install them")
    start_redis(settings)
    admin_key(settings)  # before the services: the readiness wait reads /healthz's details
    _say(f"virtlogd {daemons.ensure_virtlogd()}")
    _say(f"libvirtd {daemons.ensure_libvirtd()}")
    from workers.accel import required_kvm_refusal

    refusal = required_kvm_refusal(settings)
    if refusal:
        raise StartFailed("worker", refusal)
    ensure_image(settings)
    start_services(settings)
    _say("waiting for /healthz ...")
    return wait_healthy(settings)


def ensure_image(settings: Settings) -> None:
    from shoal import images
    from shoal.ops import image_build

    if images.locate(settings, settings.default_image) is None:
        _say(f"building the guest image {settings.default_image!r} (first run: several minutes)")
        try:
            image_build.build(settings, settings.default_image, progress=_say)
        except image_build.ImageBuildError as exc:
            raise StartFailed("image", str(exc)) from None


def _print_welcome(settings: Settings, key: str) -> None:
    url = endpoint(settings)
    tls_line = ""
    if settings.tls_port:
        ca = tls.tls_dir(settings) / "ca.pem"
        tls_line = f"\n  HTTPS:     https://127.0.0.1:{settings.tls_port} (CA: {ca})"
    curl = (
        f"curl -s -X POST {url}/v1/sessions/$(curl -s -X POST {url}/v1/sessions "
        f"-H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' -d '{{}}' "
        "| python3 -c 'import json,sys; print(json.load(sys.stdin)[\"id\"])')/executions "
        f"-H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' "
        '-d \'{"code": "print(1+1)"}\' '
        '| python3 -c \'import json,sys; print(json.load(sys.stdin)["stdout"], end="")\''
    )
    print(
        f"\nShoal is up.\n  Endpoint:  {url}{tls_line}\n"
        f"  API key:   {key}  (also in {Path(settings.home) / DEV_KEY_FILE})\n"
        f"  Admin key: in {Path(settings.home) / ADMIN_KEY_FILE} (/healthz details, /metrics)\n"
        f"  Logs:      {settings.logs_dir}/\n\nRun print(1+1) in a new session:\n{curl}\n",
        flush=True,
    )


def _stay_in_foreground(settings: Settings) -> int:
    stopping = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.append(True))
    _say("running in the foreground; Ctrl-C stops everything it started")
    while not stopping:
        time.sleep(0.5)
    _say("stopping ...")
    down(settings)
    return 0


def stop_components(settings: Settings) -> list[str]:
    return [name for name in COMPONENTS if processes.stop(settings, name)]


def destroy_vms(settings: Settings) -> int:
    """Destroy every VM of this instance on this host and remove their files."""
    from workers.vm import VMManager

    if not daemons.libvirt_answers():
        return 0
    return len(VMManager(settings).destroy_all())


def down(settings: Settings) -> int:
    stopped = stop_components(settings)
    destroyed = destroy_vms(settings)
    redis_conn.private_url_file(settings).unlink(missing_ok=True)
    _say(f"stopped {', '.join(stopped) or 'nothing (not running)'}; destroyed {destroyed} VM(s)")
    return 0


def status(settings: Settings) -> int:
    for name in reversed(COMPONENTS):
        pid = processes.running_pid(settings, name)
        print(f"{name:8} {'running, pid ' + str(pid) if pid else 'stopped'}")
    code, report = health(settings)
    print(f"/healthz: {code or 'no answer'}")
    if report:
        print(json.dumps(report, indent=2))
    return 0 if code == 200 else 1
