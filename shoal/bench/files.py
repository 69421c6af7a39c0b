"""A large file up and down: PUT /v1/sessions/{id}/files/{path}, then GET it back; MB/s each
way (MB = 10^6 bytes), with the bytes checked by SHA-256."""

from __future__ import annotations

import hashlib
import os
import tempfile
import time

from shoal.bench.core import Bench, BenchError, Result, Scenario

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


def large_file(b: Bench) -> list[Result]:
    size_mib = b.options.file_mib or b.size(16, 128)
    size = size_mib << 20
    limit = getattr(b.settings, "max_upload_bytes", size)
    size = min(size, limit)
    session_id = b.new_session()
    with tempfile.NamedTemporaryFile(prefix="shoal-bench-", suffix=".bin") as tmp:
        digest = _payload(tmp.name, size)
        try:
            with open(tmp.name, "rb") as body:
                started = time.perf_counter()
                response = b.request(
                    "PUT",
                    f"/v1/sessions/{session_id}/files/bench/big.bin",
                    data=body,
                    headers={"Content-Type": "application/octet-stream"},
                    timeout=TRANSFER_TIMEOUT_S,
                )
                up_s = time.perf_counter() - started
            if response.status_code != 201 or response.json().get("size") != size:
                raise BenchError(f"upload: {response.status_code} {response.text[:300]}")
            b.progress(f"  up: {size / 1e6 / up_s:.1f} MB/s")
            down = hashlib.sha256()
            received = 0
            started = time.perf_counter()
            with b.request(
                "GET",
                f"/v1/sessions/{session_id}/files/bench/big.bin",
                stream=True,
                timeout=TRANSFER_TIMEOUT_S,
            ) as response:
                if response.status_code != 200:
                    raise BenchError(f"download: {response.status_code} {response.text[:300]}")
                for chunk in response.iter_content(BLOCK):
                    down.update(chunk)
                    received += len(chunk)
            down_s = time.perf_counter() - started
        finally:
            b.delete_session(session_id)
    if received != size or down.hexdigest() != digest:
        raise BenchError(f"download returned {received} bytes that differ from the upload")
    b.progress(f"  down: {size / 1e6 / down_s:.1f} MB/s")
    mb = size / 1e6
    return [
        Result("file_upload", f"upload {size_mib} MiB (PUT .../files/{{path}})", unit="MB/s",
               value=mb / up_s, extra={"bytes": size, "seconds": round(up_s, 3)}),
        Result("file_download", f"download {size_mib} MiB (GET .../files/{{path}})", unit="MB/s",
               value=mb / down_s, extra={"bytes": size, "seconds": round(down_s, 3)}),
    ]  # fmt: skip


SCENARIOS = [Scenario("large_file", "(8) large file up and down", large_file)]
