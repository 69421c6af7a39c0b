"""Drive Semantic Kernel's SessionsPythonTool against a Shoal pool endpoint, as its users do.
Run with the semantic_kernel client venv's python:

    cd tests/clients && SHOAL_ENDPOINT=https://127.0.0.1:8443/pools/default SHOAL_KEY=... \\
        SSL_CERT_FILE=$SHOAL_HOME/tls/ca.pem \\
        /var/cache/shoal/client-venvs/semantic_kernel/bin/python drive_semantic_kernel.py

The tool refuses http:// endpoints (its settings type is HttpsUrl), so SHOAL_ENDPOINT must be the
https one; httpx trusts the CA named by SSL_CERT_FILE. The tool's default HTTP client has a 5 s
timeout, which every call (the first one, which makes the session, included) must beat.
Prints one JSON line (see driver_common.py); exits non-zero on any mismatch.
"""

from __future__ import annotations

import asyncio
import re
import tempfile
from pathlib import Path

from driver_common import Report, file_bytes, run
from semantic_kernel import Kernel
from semantic_kernel.core_plugins.sessions_python_tool import SessionsPythonTool
from semantic_kernel.exceptions.function_exceptions import FunctionInitializationError

OUTPUT = re.compile(
    r"\AStatus:\n(?P<status>.*?)\nResult:\n(?P<result>.*?)\nStdout:\n(?P<stdout>.*?)\n"
    r"Stderr:\n(?P<stderr>.*)\Z",
    re.S,
)


def parse(text: str) -> dict:
    """The tool's answer is text: Status/Result/Stdout/Stderr sections."""
    match = OUTPUT.match(text)
    return match.groupdict() if match else {"unparsed": text}


async def drive(report: Report, endpoint: str, key: str, workdir: Path) -> None:
    # The tool refuses a plain-http endpoint; Shoal's https listener is what it needs.
    try:
        SessionsPythonTool(
            pool_management_endpoint=endpoint.replace("https://", "http://", 1),
            auth_callback=lambda: key,
        )
        refused = False
    except FunctionInitializationError:
        refused = True
    report.check("refuses_http_endpoint", refused)

    tool = SessionsPythonTool(
        pool_management_endpoint=endpoint,
        auth_callback=lambda: key,
        enable_dangerous_file_uploads=True,
        allowed_upload_directories=[str(workdir)],
    )
    report.session(tool.settings.session_id)

    # 1. State persists between calls (timeoutInSeconds 100 is in every request body).
    with report.timed("first_execute"):
        first = parse(await tool.execute_code("x = 6 * 7\nprint('hello from shoal')"))
    report.check(
        "first_success",
        first.get("status") == "Success" and first.get("stdout") == "hello from shoal\n",
        first,
    )
    with report.timed("second_execute"):
        second = parse(await tool.execute_code("x"))
    report.check("state_persists", second.get("result") == "42", second)

    # 2. Through a Kernel, the way an agent calls the plugin's execute_code function.
    kernel = Kernel()
    kernel.add_plugin(tool, "python")
    answer = await kernel.invoke(plugin_name="python", function_name="execute_code", code="x + 1")
    via_kernel = parse(str(answer))
    report.check("kernel_invoke", via_kernel.get("result") == "43", via_kernel)

    # 3. Code that raises is not an HTTP error: status Failure, the traceback in Stderr.
    failed = parse(await tool.execute_code("1 / 0"))
    report.check(
        "error_reported",
        failed.get("status") == "Failure" and "ZeroDivisionError" in failed.get("stderr", ""),
        failed,
    )

    # 4. Files: upload (files/upload, then it lists files to find the new one), list, download.
    content = file_bytes()
    local = workdir / "data.csv"
    local.write_bytes(content)
    meta = await tool.upload_file(local_file_path=str(local))
    report.check(
        "upload_metadata",
        meta.full_path == "/mnt/data/data.csv" and meta.size_in_bytes == len(content),
        {"filename": meta.filename, "size": meta.size_in_bytes},
    )
    listed = {f.full_path: f.size_in_bytes for f in await tool.list_files()}
    report.check("list_files", listed.get("/mnt/data/data.csv") == len(content), listed)
    seen = parse(await tool.execute_code("print(open('/mnt/data/data.csv').read(), end='')"))
    report.check("code_reads_upload", seen.get("stdout") == content.decode(), seen)
    data = await tool.download_file(remote_file_name="data.csv")
    report.check("download_upload", data is not None and data.read() == content)
    await tool.execute_code(
        "with open('/mnt/data/out.txt', 'w') as f:\n    f.write('written in the session')"
    )
    target = workdir / "out.txt"
    await tool.download_file(remote_file_name="out.txt", local_file_path=str(target))
    report.check(
        "download_generated",
        target.exists() and target.read_bytes() == b"written in the session",
    )
    await tool.http_client.aclose()


def main(report: Report, endpoint: str, key: str) -> None:
    with tempfile.TemporaryDirectory() as workdir:
        asyncio.run(drive(report, endpoint, key, Path(workdir)))


if __name__ == "__main__":
    run("semantic_kernel", main)
