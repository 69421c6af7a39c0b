"""The Python client SDK (clients/python, `shoal_client`) against the shared stack: the sync
and async clients over every session (sleep and wake included), execution and file route,
errors as exceptions with Shoal's codes, retries through a proxy that refuses connections or
drops an answer (a retried submit runs its code once), the HTTPS listener with the instance's
own CA, and configuration from SHOAL_URL / SHOAL_API_KEY."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
from shoal_client import (
    AsyncClient,
    Client,
    ExecutionFailed,
    NotFound,
    Unauthorized,
    batch_item,
)

from tests.integration.conftest import Stack
from tests.integration.flaky_proxy import FlakyProxy

pytestmark = pytest.mark.guest

COUNT_RUNS = "runs = globals().get('runs', 0) + 1\nruns"


def test_a_session_runs_code_statefully_and_moves_files(stack: Stack, tmp_path: Path) -> None:
    local = tmp_path / "in.bin"
    local.write_bytes(os.urandom(3 << 20) + b"tail")
    with Client(stack.url, stack.key) as client:
        with client.session() as s:
            assert s.run("x = 41").status == "succeeded"
            assert s.run("x + 1").text == "42"
            assert s.shell("echo hi; exit 3").exit_code == 3
            failed = s.run("1 / 0")
            assert failed.status == "failed" and failed.error["name"] == "ZeroDivisionError"
            with pytest.raises(ExecutionFailed, match="ZeroDivisionError"):
                failed.raise_for_status()
            plot = s.run("import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.show()")
            (image,) = plot.save_images(tmp_path / "plots")
            assert image.read_bytes().startswith(b"\x89PNG")

            assert s.files.upload("notes/a.txt", b"hello").size == 5
            entry = s.files.upload("big/in.bin", local)
            assert entry.size == local.stat().st_size and entry.type == "file"
            assert s.run("open('notes/a.txt').read()").text == "'hello'"
            listed = {f.path for f in s.files.list(recursive=True)}
            assert {"notes/a.txt", "big/in.bin"} <= listed
            assert s.files.download("notes/a.txt") == b"hello"
            copy = s.files.download_to("big/in.bin", tmp_path / "out.bin")
            assert _digest(copy) == _digest(local)
            s.files.delete("notes/a.txt")
            with pytest.raises(NotFound) as missing:
                s.files.download("notes/a.txt")
            assert missing.value.code == "FileNotFound" and missing.value.status == 404
            assert s.id in {info.id for info in client.list_sessions()}
        with pytest.raises(NotFound) as gone:  # the `with` deleted it
            client.get_session(s.id)
        assert gone.value.code == "SessionNotFound"


def test_a_session_sleeps_and_the_next_run_wakes_it(stack: Stack) -> None:
    with Client(stack.url, stack.key) as client, client.session(pool="napping") as s:
        s.run("kept = [1, 2, 3]")
        assert s.sleep().id == s.id
        deadline = time.monotonic() + 60
        while s.refresh().state != "sleeping":
            assert time.monotonic() < deadline, s.info
            time.sleep(0.2)
        assert client.get_session(s.id).slept_at == s.info.slept_at
        assert s.run("sum(kept)").text == "6"  # woken by the run itself
        assert s.refresh().state == "active" and s.info.slept_at is None


def test_a_session_forks_and_a_batch_runs_in_its_forks(stack: Stack) -> None:
    with Client(stack.url, stack.key) as client, client.session() as s:
        s.run("kept = [1, 2, 3]")
        forks = s.fork(2)
        try:
            assert [f.info.forked_from for f in forks] == [s.id, s.id]
            assert [f.run("sum(kept)").text for f in forks] == ["6", "6"]
        finally:
            for fork in forks:
                fork.delete()
        batch = client.submit_batch([{"code": "len(kept)"}], from_session=s.id)
        items = list(client.iter_batch(batch["id"], poll_s=0.2))
        assert [item.execution.text for item in items] == ["3"], items


def test_submit_poll_and_cancel(stack: Stack) -> None:
    with Client(stack.url, stack.key) as client, client.session() as s:
        queued = s.submit("import time; time.sleep(30)")
        assert queued.status in ("queued", "running")
        client.cancel(queued.id)
        assert client.wait_for(queued.id, timeout_s=60).status == "cancelled"
        quick = s.submit("6 * 7")
        assert client.wait_for(quick.id, timeout_s=60).text == "42"
        assert client.pool("default")["name"] == "default"
        assert any(p["name"] == "default" for p in client.pools())
        assert "pools" in client.usage()


def test_the_async_client_has_the_same_surface(stack: Stack, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with AsyncClient(stack.url, stack.key) as client:
            async with await client.session() as s:
                await s.run("y = 'async'")
                assert (await s.run("y")).text == "'async'"
                await s.files.upload("a/b.txt", b"bytes")
                assert await s.files.download("a/b.txt") == b"bytes"
                await s.files.download_to("a/b.txt", tmp_path / "b.txt")
                assert [f.path for f in await s.files.list("a")] == ["a/b.txt"]
                running = await s.submit("import time; time.sleep(30)")
                await client.cancel(running.id)
                assert (await client.wait_for(running.id, 60)).status == "cancelled"
            async with await client.session(pool="napping") as napper:
                await napper.run("z = 'asleep'")
                await napper.sleep()
                while (await napper.refresh()).state != "sleeping":
                    await asyncio.sleep(0.2)
                assert napper.info.slept_at and napper.info.sleep_expires_at
                await napper.wake()
                while (await napper.refresh()).state != "active":
                    await asyncio.sleep(0.2)
                assert (await napper.run("z")).text == "'asleep'"
            with pytest.raises(NotFound):
                await client.get_session(s.id)

    asyncio.run(scenario())
    assert (tmp_path / "b.txt").read_bytes() == b"bytes"


def test_refused_connections_are_retried(stack: Stack) -> None:
    proxy = FlakyProxy(urlparse(stack.url).port, drop_connections=2)
    try:
        with Client(proxy.url, stack.key) as client:
            assert client.pool("default")["name"] == "default"
        assert proxy.connections == 3
    finally:
        proxy.close()


def test_a_submit_whose_answer_was_lost_is_retried_and_runs_once(stack: Stack) -> None:
    with Client(stack.url, stack.key) as direct, direct.session() as s:
        proxy = FlakyProxy(urlparse(stack.url).port, drop_answers=1)
        try:
            with Client(proxy.url, stack.key) as flaky:
                assert flaky.run(s.id, COUNT_RUNS).text == "1"  # the retry got the first run
            assert proxy.connections == 2
        finally:
            proxy.close()
        assert s.run("runs").text == "1"  # the code ran once


def test_errors_carry_the_code_and_a_wrong_key_is_unauthorized(stack: Stack) -> None:
    with Client(stack.url, "shoal_never_issued") as client, pytest.raises(Unauthorized) as refused:
        client.pools()
    assert refused.value.code == "Unauthorized" and refused.value.status == 401
    with Client(stack.url, stack.key) as client, pytest.raises(NotFound) as missing:
        client.get_execution("exe_0000000000000000000")
    assert missing.value.code == "ExecutionNotFound"


def test_https_with_the_instances_ca_and_settings_from_the_environment(
    stack: Stack, monkeypatch
) -> None:
    monkeypatch.setenv("SHOAL_URL", stack.tls_url)
    monkeypatch.setenv("SHOAL_API_KEY", stack.key)
    monkeypatch.setenv("SHOAL_CA_FILE", str(stack.home / "tls" / "ca.pem"))
    with Client() as client:
        assert client.config.url.startswith("https://")
        assert client.pool("default")["name"] == "default"


def test_a_batch_is_iterated_as_its_items_finish(stack: Stack) -> None:
    items = [
        batch_item("open('in.txt').read().upper()", files={"in.txt": b"abc"}),
        batch_item("mkdir -p out && echo made > out/x.txt", "shell", collect=["out/*.txt"]),
        batch_item("1 / 0"),
    ]
    with Client(stack.url, stack.key) as client:
        batch = client.submit_batch(items, max_parallel=3)
        finished = {item.index: item for item in client.iter_batch(batch["id"], poll_s=0.2)}
        assert client.get_batch(batch["id"])["status"] == "completed"
    assert sorted(finished) == [0, 1, 2]  # each once
    assert finished[0].execution.text == "'ABC'"
    assert finished[1].files == {"out/x.txt": b"made\n"}
    assert finished[2].status == "failed" and finished[2].execution.error["name"] == (
        "ZeroDivisionError"
    )


def test_shoal_run_runs_a_file_and_brings_files_back(stack: Stack, tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text(
        "import os\nrows = open('in.csv').read().splitlines()\n"
        "os.makedirs('out', exist_ok=True)\nopen('out/n.txt', 'w').write(str(len(rows)))\n"
        "print('rows', len(rows))\n"
    )
    data = tmp_path / "in.csv"
    data.write_text("a\nb\nc\n")
    env = {**os.environ, "SHOAL_URL": stack.url, "SHOAL_API_KEY": stack.key}
    run = subprocess.run(
        [Path(sys.executable).with_name("shoal-run"), str(script), "--files", str(data),
         "--collect", "out/*", "--out", str(tmp_path / "got")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout == "rows 3\n"
    assert (tmp_path / "got" / "out" / "n.txt").read_text() == "3"
    failing = tmp_path / "fail.py"
    failing.write_text("raise ValueError('nope')\n")
    run = subprocess.run([Path(sys.executable).with_name("shoal-run"), str(failing)],
                         env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 1 and "ValueError" in run.stderr


# Run in a process of its own, so its peak resident memory is the client's alone.
STREAM_BOTH_WAYS = r"""
import hashlib, os, sys
from shoal_client import Client
url, key, work = sys.argv[1], sys.argv[2], sys.argv[3]
source, copy = os.path.join(work, "up.bin"), os.path.join(work, "down.bin")
digest = hashlib.sha256()
with open(source, "wb") as f:
    for _ in range(100):
        block = os.urandom(1 << 20)
        digest.update(block)
        f.write(block)
with Client(url, key) as client, client.session() as s:
    assert s.files.upload("big.bin", source).size == 100 << 20
    s.files.download_to("big.bin", copy)
back = hashlib.sha256()
with open(copy, "rb") as f:
    while block := f.read(1 << 20):
        back.update(block)
assert back.hexdigest() == digest.hexdigest()
# VmHWM, not ru_maxrss: the latter keeps the spawning process's peak across exec.
peak = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
print(int(peak.split()[1]) // 1024)
"""


def test_100_mib_streams_both_ways_with_the_clients_memory_bounded(
    stack: Stack, tmp_path: Path
) -> None:
    run = subprocess.run(
        [sys.executable, "-c", STREAM_BOTH_WAYS, stack.url, stack.key, str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    peak_mib = int(run.stdout.split()[-1])
    # Python with httpx and the client imported is ~32 MiB here; a whole file would be 100 more.
    assert peak_mib < 64, f"the client peaked at {peak_mib} MiB for a 100 MiB file"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
