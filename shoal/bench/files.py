"""A large file up and down: PUT /v1/sessions/{id}/files/{path}, then GET it back; MB/s each
way (MB = 10^6 bytes), with the bytes checked by SHA-256, and how much the API's and the host
worker's resident memory grew meanwhile (their peak over what they held before: a file that
streams costs them a bounded buffer, never its size)."""

from __future__ import annotations

import hashlib
import os
import tempfile
import time

from shoal.bench.core import Bench, BenchError, Goal, Result, Scenario
from shoal.bench.process_memory import PeakGrowth

BLOCK = 1 << 20
TRANSFER_TIMEOUT_S = 600


def _payload(path: str, size: int) -> str:
    """Write `size` incompressible bytes to `path`; their SHA-256."""
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            block = os.urandom(min(BLOCK, left))
            digest.update(block)
            f.write(block)
            left -= len(block)
    return digest.hexdigest()


def _upload(b: Bench, url: str, path: str, size: int) -> tuple[float, PeakGrowth]:
    """PUT the file at `path`: (seconds, the components' memory growth)."""
    with open(path, "rb") as body, PeakGrowth(b.settings) as memory:
        started = time.perf_counter()
        response = b.request(
            "PUT",
            url,
            data=body,
            headers={"Content-Type": "application/octet-stream"},
            timeout=TRANSFER_TIMEOUT_S,
        )
        seconds = time.perf_counter() - started
    if response.status_code != 201 or response.json().get("size") != size:
        raise BenchError(f"upload: {response.status_code} {response.text[:300]}")
    return seconds, memory


def _download(b: Bench, url: str, size: int, digest: str) -> tuple[float, PeakGrowth]:
    """GET the file back, checked against `digest`: (seconds, the memory growth)."""
    down = hashlib.sha256()
    received = 0
    with PeakGrowth(b.settings) as memory:
        started = time.perf_counter()
        with b.request("GET", url, stream=True, timeout=TRANSFER_TIMEOUT_S) as response:
            if response.status_code != 200:
                raise BenchError(f"download: {response.status_code} {response.text[:300]}")
            for chunk in response.iter_content(BLOCK):
                down.update(chunk)
                received += len(chunk)
        seconds = time.perf_counter() - started
    if received != size or down.hexdigest() != digest:
        raise BenchError(f"download returned {received} bytes that differ from the upload")
    return seconds, memory


def large_file(b: Bench) -> list[Result]:
    """Up, down, and down again: an upload skips the guest's page cache (docs/agent-protocol.md,
    the transfer disk), so the first download reads the disk and the second the cache."""
    size_mib = b.options.file_mib or b.size(16, 128)
    size = min(size_mib << 20, getattr(b.settings, "max_upload_bytes", size_mib << 20))
    session_id = b.new_session()
    url = f"/v1/sessions/{session_id}/files/bench/big.bin"
    runs = []
    with tempfile.NamedTemporaryFile(prefix="shoal-bench-", suffix=".bin") as tmp:
        digest = _payload(tmp.name, size)
        try:
            runs.append(("up", _upload(b, url, tmp.name, size)))
            runs.append(("down", _download(b, url, size, digest)))
            runs.append(("down again", _download(b, url, size, digest)))
        finally:
            b.delete_session(session_id)
    results = []
    for (way, (seconds, memory)), (name, what) in zip(runs, _RESULTS, strict=True):
        growth = memory.growth_mb()
        b.progress(f"  {way}: {size / 1e6 / seconds:.1f} MB/s, memory growth {growth} MB")
        extra = {"bytes": size, "seconds": round(seconds, 3), "rss_growth_mb": growth}
        goals = (UPLOAD_GOAL,) if name == "file_upload" and not b.quick else ()
        results.append(Result(name, what.format(mib=size >> 20), unit="MB/s",
                              value=size / 1e6 / seconds, extra=extra, goals=goals))  # fmt: skip
    return results


UPLOAD_GOAL = Goal(">= 100 MB/s (128 MiB)", "value", 100.0, at_least=True, issue=16)
_RESULTS = [
    ("file_upload", "upload {mib} MiB (PUT .../files/{{path}})"),
    ("file_download", "download {mib} MiB (GET .../files/{{path}}), read from the guest's disk"),
    ("file_download_cached", "the same download again, from the guest's page cache"),
]


SCENARIOS = [Scenario("large_file", "(8) large file up and down", large_file)]
