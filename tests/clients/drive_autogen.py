"""Drive AutoGen's ACADynamicSessionsCodeExecutor (autogen-ext[azure]) against a Shoal pool
endpoint, as its users do. Run with the autogen client venv's python:

    SHOAL_ENDPOINT=http://127.0.0.1:8080/pools/default SHOAL_KEY=... \\
        /var/cache/shoal/client-venvs/autogen/bin/python tests/clients/drive_autogen.py

The executor wants an azure-identity style credential (get_token(scope) -> AccessToken); a tiny
one returning the Shoal key stands in for it. For https set SSL_CERT_FILE (aiohttp uses Python's
default SSL context). Prints one JSON line (see driver_common.py); exits non-zero on a mismatch.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from tempfile import TemporaryDirectory

from autogen_core import CancellationToken
from autogen_core.code_executor import CodeBlock, with_requirements
from autogen_ext.code_executors.azure import ACADynamicSessionsCodeExecutor
from azure.core.credentials import AccessToken
from driver_common import Report, file_bytes, run


class ShoalKeyCredential:
    """The TokenProvider protocol the executor asks for, answering with a Shoal API key."""

    def __init__(self, key: str):
        self.key = key

    def get_token(self, *scopes: str, **kwargs: object) -> AccessToken:
        return AccessToken(self.key, int(time.time()) + 3600)


@with_requirements(python_packages=["numpy"], global_imports=["numpy"])
def mean_of(values: list[float]) -> float:
    """The mean of values, with numpy (a package the session must report as available)."""
    return float(numpy.mean(values))  # noqa: F821 - imported by the functions preamble


def python(code: str) -> list[CodeBlock]:
    return [CodeBlock(code=code, language="python")]


async def drive(report: Report, endpoint: str, key: str, workdir: Path) -> None:
    token = CancellationToken()
    executor = ACADynamicSessionsCodeExecutor(
        pool_management_endpoint=endpoint,
        credential=ShoalKeyCredential(key),
        work_dir=workdir,
    )
    report.session(executor._session_id)  # private, read only to clean up afterwards
    await executor.start()

    # 1. The first run lists the available packages (pkg_resources), chdirs to /mnt/data and
    #    runs the code; state persists to the next run.
    with report.timed("first_execute"):
        first = await executor.execute_code_blocks(
            python("x = 6 * 7\nprint('hello from shoal')"), token
        )
    report.check(
        "first_success",
        first.exit_code == 0 and first.output == "hello from shoal\n",
        {"exit_code": first.exit_code, "output": first.output},
    )
    with report.timed("second_execute"):
        second = await executor.execute_code_blocks(python("x"), token)
    report.check(
        "state_persists",
        second.exit_code == 0 and second.output == "42",
        {"exit_code": second.exit_code, "output": second.output},
    )
    cwd = await executor.execute_code_blocks(python("import os\nprint(os.getcwd())"), token)
    report.check("cwd_is_mnt_data", cwd.output == "/mnt/data\n", cwd.output)

    # 2. get_available_packages parses the repr of a list of names out of the result.
    packages = await executor.get_available_packages(token)
    report.check(
        "available_packages",
        {"numpy", "pandas", "matplotlib"} <= packages,
        sorted(packages)[:10] + [f"... {len(packages)} in all"],
    )

    # 3. Code that raises: exit code 1, the traceback in the output.
    failed = await executor.execute_code_blocks(python("1 / 0"), token)
    report.check(
        "error_reported",
        failed.exit_code == 1 and "ZeroDivisionError" in failed.output,
        {"exit_code": failed.exit_code, "output": failed.output},
    )

    # 4. Files: upload from work_dir, list (bare names), read in code (cwd is /mnt/data),
    #    download into work_dir.
    content = file_bytes()
    (workdir / "data.csv").write_bytes(content)
    await executor.upload_files(["data.csv"], token)
    names = await executor.get_file_list(token)
    report.check("list_files", "data.csv" in names, names)
    seen = await executor.execute_code_blocks(
        python("print(open('data.csv').read(), end='')"), token
    )
    report.check("code_reads_upload", seen.output == content.decode(), seen.output)
    await executor.execute_code_blocks(
        python("with open('out.txt', 'w') as f:\n    f.write('written in the session')"), token
    )
    paths = await executor.download_files(["out.txt"], token)
    report.check(
        "download_generated",
        paths == [str(workdir / "out.txt")]
        and (workdir / "out.txt").read_bytes() == b"written in the session",
        paths,
    )

    # 5. restart() moves to a new session identifier: the old state is not there.
    await executor.restart()
    report.session(executor._session_id)
    fresh = await executor.execute_code_blocks(python("x"), token)
    report.check(
        "restart_fresh_session",
        fresh.exit_code == 1 and "NameError" in fresh.output,
        {"exit_code": fresh.exit_code, "output": fresh.output},
    )
    await executor.stop()

    # 6. Functions with package requirements: loaded once per session, checked against
    #    get_available_packages.
    with_functions = ACADynamicSessionsCodeExecutor(
        pool_management_endpoint=endpoint,
        credential=ShoalKeyCredential(key),
        work_dir=workdir / "functions",
        functions=[mean_of],
    )
    report.session(with_functions._session_id)
    await with_functions.start()
    try:
        result = await with_functions.execute_code_blocks(python("mean_of([1, 2, 3, 6])"), token)
        report.check(
            "functions_with_requirements",
            result.exit_code == 0 and result.output == "3.0",
            {"exit_code": result.exit_code, "output": result.output},
        )
    except ValueError as exc:  # "Packages unavailable in environment" / "Functions failed"
        report.check("functions_with_requirements", False, str(exc))
    await with_functions.stop()


def main(report: Report, endpoint: str, key: str) -> None:
    with TemporaryDirectory() as workdir:
        asyncio.run(drive(report, endpoint, key, Path(workdir)))


if __name__ == "__main__":
    run("autogen", main)
