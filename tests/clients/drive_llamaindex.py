"""Drive LlamaIndex's AzureCodeInterpreterToolSpec (llama-index-tools-azure-code-interpreter)
against a Shoal pool endpoint, as its users do. Run with the llamaindex client venv's python:

    SHOAL_ENDPOINT=http://127.0.0.1:8080/pools/default SHOAL_KEY=... \\
        /var/cache/shoal/client-venvs/llamaindex/bin/python tests/clients/drive_llamaindex.py

The spec takes no token argument: users replace its `access_token_provider` attribute (its
default asks Azure for a token). For https set REQUESTS_CA_BUNDLE to Shoal's ca.pem.
Prints one JSON line (see driver_common.py); exits non-zero on any mismatch.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from driver_common import Report, file_bytes, run
from llama_index.tools.azure_code_interpreter import AzureCodeInterpreterToolSpec

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def drive(report: Report, endpoint: str, key: str, workdir: Path) -> None:
    saved = workdir / "saved"
    saved.mkdir()
    spec = AzureCodeInterpreterToolSpec(
        pool_management_endpoint=endpoint, local_save_path=str(saved)
    )
    spec.access_token_provider = lambda: key
    report.session(spec.session_id)
    tools = {t.metadata.name: t for t in spec.to_tool_list()}
    report.check("tool_list", sorted(tools) == ["code_interpreter", "list_files"], sorted(tools))

    # 1. State persists: once through the agent-facing FunctionTool, once through the spec.
    with report.timed("first_execute"):
        output = tools["code_interpreter"].call(python_code="x = 6 * 7\nprint('hello from shoal')")
    first = output.raw_output
    props = first.get("properties", {})
    report.check(
        "first_success",
        props.get("status") == "Success" and props.get("stdout") == "hello from shoal\n",
        first,
    )
    with report.timed("second_execute"):
        second = spec.code_interpreter("x")
    report.check("state_persists", str(second.get("properties", {}).get("result")) == "42", second)

    # 2. Code that raises: 200, status Failure, the traceback in stderr.
    failed = spec.code_interpreter("1 / 0").get("properties", {})
    report.check(
        "error_reported",
        failed.get("status") == "Failure" and "ZeroDivisionError" in failed.get("stderr", ""),
        failed,
    )

    # 3. An image result is written under local_save_path (base64_data replaced by a flag).
    code = "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [1, 4, 9])\nplt.show()"
    with report.timed("image_execute"):
        image = spec.code_interpreter(code).get("properties", {})
    pngs = sorted(saved.glob("*.png"))
    report.check(
        "image_saved",
        isinstance(image.get("result"), dict)
        and image["result"].get("saved_to_local_path") is True
        and len(pngs) == 1
        and pngs[0].read_bytes().startswith(PNG_MAGIC),
        {"result": image.get("result"), "saved": [p.name for p in pngs]},
    )

    # 4. Files: upload (its filename is /mnt/data/<name>), list, read in code, download.
    content = file_bytes()
    local = workdir / "data.csv"
    local.write_bytes(content)
    uploaded = spec.upload_file(local_file_path=str(local))
    report.check(
        "upload_metadata",
        len(uploaded) == 1
        and uploaded[0].file_full_path == "/mnt/data/data.csv"
        and uploaded[0].size_in_bytes == len(content),
        [vars(u) for u in uploaded],
    )
    listed = {f.file_full_path: f.size_in_bytes for f in spec.list_files()}
    report.check("list_files", listed.get("/mnt/data/data.csv") == len(content), listed)
    via_tool = tools["list_files"].call().raw_output
    report.check("list_files_tool", any(f.file_full_path == "/mnt/data/data.csv" for f in via_tool))
    seen = spec.code_interpreter("print(open('/mnt/data/data.csv').read(), end='')")
    report.check(
        "code_reads_upload", seen.get("properties", {}).get("stdout") == content.decode(), seen
    )
    data = spec.download_file_to_local("/mnt/data/data.csv")
    report.check("download_upload", data is not None and data.read() == content)
    spec.code_interpreter(
        "with open('/mnt/data/out.txt', 'w') as f:\n    f.write('written in the session')"
    )
    target = workdir / "out.txt"
    spec.download_file_to_local("out.txt", local_file_path=str(target))
    report.check(
        "download_generated",
        target.exists() and target.read_bytes() == b"written in the session",
    )


def main(report: Report, endpoint: str, key: str) -> None:
    with tempfile.TemporaryDirectory() as workdir:
        drive(report, endpoint, key, Path(workdir))


if __name__ == "__main__":
    run("llamaindex", main)
