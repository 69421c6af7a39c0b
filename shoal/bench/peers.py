"""What users would run instead of Shoal, measured in the same run on the same machine:
- `ipykernel`: a local, unsandboxed ipykernel driven by jupyter_client (`x += 1`), and
  `ipykernel_start`: starting such a kernel to its first execution answered;
- `celery_noop`: a no-op Celery task round trip (`delay().get()`, Redis broker and result
  backend, solo-pool worker) on the Redis of the instance under test: our design's floor;
- `kernel_gateway`: Jupyter Kernel Gateway's execute round trip over REST + WebSocket.
Every process started here is stopped by its own handle at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse, urlunparse

import requests

from shoal.bench.core import Bench, BenchError, Result, Scenario, timed_loop
from shoal.ops.stack import free_port

WARM_UP = 20
START_TIMEOUT_S = 60
PEER_DB = 15
# A local kernel as jupyter_client starts it; its start-up warnings kept off the progress lines.
KERNEL = {
    "kernel_name": "python3",
    "startup_timeout": START_TIMEOUT_S,
    "stdout": subprocess.DEVNULL,
    "stderr": subprocess.DEVNULL,
}  # the Celery peer's keys live in their own database of the same Redis server


@contextlib.contextmanager
def _runtime_dir() -> Iterator[str]:
    """Jupyter's connection files in a directory of our own, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="shoal-bench-jupyter-") as tmp:
        old = os.environ.get("JUPYTER_RUNTIME_DIR")
        os.environ["JUPYTER_RUNTIME_DIR"] = tmp
        try:
            yield tmp
        finally:
            if old is None:
                os.environ.pop("JUPYTER_RUNTIME_DIR", None)
            else:
                os.environ["JUPYTER_RUNTIME_DIR"] = old


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


# --- a local ipykernel -----------------------------------------------------------------------
def ipykernel(b: Bench) -> list[Result]:
    from jupyter_client.manager import start_new_kernel

    starts = []
    with _runtime_dir():
        for _ in range(b.size(2, 3)):
            started = time.perf_counter()
            km, kc = start_new_kernel(**KERNEL)
            try:
                _kernel_execute(kc, "1")
                starts.append((time.perf_counter() - started) * 1000)
            finally:
                kc.stop_channels()
                km.shutdown_kernel(now=True)
        km, kc = start_new_kernel(**KERNEL)
        try:
            _kernel_execute(kc, "x = 0")
            for _ in range(WARM_UP):
                _kernel_execute(kc, "x += 1")
            samples = timed_loop(b.size(200, 500), 60, lambda _i: _kernel_execute(kc, "x += 1"))
        finally:
            kc.stop_channels()
            km.shutdown_kernel(now=True)
    return [
        Result("ipykernel", "peer: local ipykernel, jupyter_client, `x += 1` (no sandbox)",
               samples=samples),
        Result("ipykernel_start", "peer: start a local ipykernel to its first execution",
               samples=starts),
    ]  # fmt: skip


def _kernel_execute(kc, code: str) -> float:
    started = time.perf_counter()
    reply = kc.execute_interactive(code, timeout=30, output_hook=lambda _msg: None)
    ms = (time.perf_counter() - started) * 1000
    if reply["content"]["status"] != "ok":
        raise BenchError(f"ipykernel: {reply['content']}")
    return ms


# --- a no-op Celery task ---------------------------------------------------------------------
def _peer_redis_url(b: Bench) -> str:
    if b.options.redis_url:
        url = b.options.redis_url
    else:
        from shoal import redis_conn

        try:
            url = redis_conn.redis_url(b.settings)
        except SystemExit as exc:
            raise BenchError(
                f"no Redis URL for the Celery peer ({exc}); pass --redis-url"
            ) from None
    parts = urlparse(url)
    if parts.hostname not in ("127.0.0.1", "localhost"):
        raise BenchError(f"the Celery peer only uses a Redis on 127.0.0.1, not {url}")
    return urlunparse(parts._replace(path=f"/{PEER_DB}"))


def celery_noop(b: Bench) -> list[Result]:
    from shoal.bench import celery_peer

    url = _peer_redis_url(b)
    queue = "shoal-bench-peer-" + secrets.token_hex(4)
    env = {**os.environ, celery_peer.URL_ENV: url, celery_peer.QUEUE_ENV: queue}
    argv = [sys.executable, "-m", "celery", "-A", "shoal.bench.celery_peer", "worker"]
    argv += ["-P", "solo", "-Q", queue, "-l", "WARNING"]
    argv += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
    with tempfile.TemporaryFile() as log:
        worker = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        app = celery_peer.make_app(url, queue)
        noop = app.tasks["bench.noop"]
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                try:
                    noop.delay().get(timeout=2)
                    break
                except Exception as exc:  # noqa: BLE001 - not up yet
                    if worker.poll() is not None or time.monotonic() > deadline:
                        log.seek(0)
                        tail = log.read()[-1500:].decode(errors="replace")
                        raise BenchError(f"the Celery peer worker did not answer: {tail}") from exc
            for _ in range(WARM_UP):
                noop.delay().get(timeout=10)

            def one(_i: int) -> float:
                started = time.perf_counter()
                noop.delay().get(timeout=10)
                return (time.perf_counter() - started) * 1000

            samples = timed_loop(b.size(200, 500), 60, one)
        finally:
            _stop(worker)
            with contextlib.suppress(Exception):
                app.control.purge()
            app.close()
    return [
        Result(
            "celery_noop",
            "peer: no-op Celery task, delay().get(), Redis backend, solo worker",
            samples=samples,
            notes=f"same Redis server as the instance, database {PEER_DB}",
        )
    ]


# --- Jupyter Kernel Gateway --------------------------------------------------------------------
def kernel_gateway(b: Bench) -> list[Result]:
    import websocket

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    gateway_bin = Path(sys.executable).parent / "jupyter-kernelgateway"
    argv = [str(gateway_bin), "--KernelGatewayApp.ip=127.0.0.1", f"--KernelGatewayApp.port={port}"]
    argv += ["--KernelGatewayApp.port_retries=0", "--log-level=WARN"]
    with _runtime_dir(), tempfile.TemporaryFile() as log:
        gateway = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_http(base + "/api", gateway, log)
            started = time.perf_counter()
            response = requests.post(base + "/api/kernels", json={"name": "python3"}, timeout=60)
            if response.status_code != 201:
                raise BenchError(f"POST /api/kernels: {response.status_code} {response.text}")
            kernel_ms = (time.perf_counter() - started) * 1000
            kernel_id = response.json()["id"]
            ws = websocket.create_connection(
                f"ws://127.0.0.1:{port}/api/kernels/{kernel_id}/channels", timeout=30
            )
            try:
                session = secrets.token_hex(8)
                _ws_execute(ws, session, "x = 0")
                for _ in range(WARM_UP):
                    _ws_execute(ws, session, "x += 1")
                samples = timed_loop(
                    b.size(200, 500), 60, lambda _i: _ws_execute(ws, session, "x += 1")
                )
            finally:
                ws.close()
                requests.delete(f"{base}/api/kernels/{kernel_id}", timeout=30)
        finally:
            _stop(gateway)
    return [
        Result(
            "kernel_gateway",
            "peer: Jupyter Kernel Gateway, execute over its WebSocket, `x += 1`",
            samples=samples,
            notes="one WebSocket kept open; kernel started by POST /api/kernels",
            extra={"kernel_start_ms": round(kernel_ms, 1)},
        )
    ]


def _wait_http(url: str, process: subprocess.Popen, log) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        with contextlib.suppress(requests.RequestException):
            if requests.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    log.seek(0)
    raise BenchError(f"{url} did not answer: {log.read()[-1500:].decode(errors='replace')}")


def _ws_execute(ws, session: str, code: str) -> float:
    msg_id = secrets.token_hex(12)
    message = {
        "header": {"msg_id": msg_id, "username": "bench", "session": session,
                   "msg_type": "execute_request", "version": "5.3"},
        "parent_header": {},
        "metadata": {},
        "content": {"code": code, "silent": False, "store_history": True,
                    "user_expressions": {}, "allow_stdin": False, "stop_on_error": True},
        "channel": "shell",
        "buffers": [],
    }  # fmt: skip
    started = time.perf_counter()
    ws.send(json.dumps(message))
    replied = idle = False
    while not (replied and idle):
        answer = json.loads(ws.recv())
        if answer.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        kind = answer.get("msg_type") or answer["header"]["msg_type"]
        if kind == "execute_reply":
            if answer["content"]["status"] != "ok":
                raise BenchError(f"kernel gateway: {answer['content']}")
            replied = True
        elif kind == "status" and answer["content"].get("execution_state") == "idle":
            idle = True
    return (time.perf_counter() - started) * 1000


SCENARIOS = [
    Scenario("ipykernel", "peer: local ipykernel (jupyter_client)", ipykernel, peer=True),
    Scenario("celery_noop", "peer: no-op Celery task round trip", celery_noop, peer=True),
    Scenario("kernel_gateway", "peer: Jupyter Kernel Gateway", kernel_gateway, peer=True),
]
