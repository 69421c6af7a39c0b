"""Output budgets over /v1 on a real guest (docs/limits.md, "Outputs"): text parts cut at
max_output, images kept whole within the execution's rich-output budget
(SHOAL_MAX_RICH_OUTPUT_BYTES, 4 MiB on the shared stack) and dropped beyond it, a 64 MiB result
cut instead of lost; each cut flagged and noted, in the answer and in the stored record alike.

One session for the module (each costs a snapshot restore); it is deleted at the end, so the
64 MiB the interpreter keeps in `_` does not outlive the module.
"""

from __future__ import annotations

import base64
import hashlib

import pytest
import requests

from tests.integration.conftest import Stack

DEFAULT_BUDGET = 4 << 20


@pytest.fixture(scope="module")
def budget_session(stack: Stack):
    session_id = stack.new_session()
    yield session_id
    requests.delete(f"{stack.url}/v1/sessions/{session_id}", headers=stack.headers(), timeout=60)


def stored(stack: Stack, execution_id: str) -> dict:
    response = requests.get(
        f"{stack.url}/v1/executions/{execution_id}", headers=stack.headers(), timeout=30
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_displayed_text_is_cut_at_max_output_and_flagged(stack: Stack, budget_session: str):
    body = stack.execute(
        budget_session,
        "from IPython.display import display\n"
        "display({'text/plain': 'A' * 2_000_000}, raw=True)\n"
        "display({'text/plain': 'small'}, raw=True)",
        max_output=10,
    )
    assert body["status"] == "succeeded", body
    cut, small = body["outputs"]
    assert cut == {"type": "display", "data": {"text/plain": "A" * 10}, "truncated": True}
    assert small == {"type": "display", "data": {"text/plain": "small"}}
    assert body["outputs_truncated"] is True and body["result_truncated"] is False
    assert body["output_notes"] == [
        "outputs[0]: text/plain cut to 10 of 2000000 characters (max_output)"
    ]
    assert stored(stack, body["id"])["outputs"] == body["outputs"]


def test_images_are_kept_whole_within_the_budget_and_dropped_beyond(
    stack: Stack, budget_session: str
):
    body = stack.execute(
        budget_session,
        "import hashlib, os\n"
        "from IPython.display import display\n"
        "small = b'\\x89PNG\\r\\n\\x1a\\n' + os.urandom(100_000)\n"
        f"big = b'\\x89PNG\\r\\n\\x1a\\n' + os.urandom({DEFAULT_BUDGET + (1 << 20)})\n"
        "print(hashlib.sha256(small).hexdigest())\n"
        "display({'image/png': small, 'text/plain': 'small'}, raw=True)\n"
        "display({'image/png': big, 'text/plain': 'big'}, raw=True)",
    )
    assert body["status"] == "succeeded", body
    kept, dropped = body["outputs"]
    png = base64.b64decode(kept["data"]["image/png"])
    assert hashlib.sha256(png).hexdigest() == body["stdout"].strip()  # whole, byte for byte
    assert "truncated" not in kept
    assert dropped == {"type": "display", "data": {"text/plain": "big"}, "truncated": True}
    assert body["outputs_truncated"] is True
    (note,) = body["output_notes"]
    assert note.startswith(
        f"outputs[1]: image/png of {DEFAULT_BUDGET + (1 << 20) + 8} bytes dropped"
    )


def test_a_64_mib_image_result_is_refused_and_says_so(stack: Stack, budget_session: str):
    body = stack.execute(
        budget_session,
        "class Big:\n"
        "    def _repr_png_(self): return b'\\x89PNG\\r\\n\\x1a\\n' + bytes(64 << 20)\n"
        "Big()",
        timeout_s=120,
    )
    assert body["status"] == "succeeded", body
    assert set(body["result"]) == {"text/plain"} and "Big" in body["result"]["text/plain"]
    assert body["result_truncated"] is True
    assert body["output_notes"][0].startswith(
        f"result: image/png of {(64 << 20) + 8} bytes dropped"
    )


def test_a_64_mib_result_is_cut_and_says_so(stack: Stack, budget_session: str):
    # Last in the module: the interpreter keeps the 64 MiB string in `_` until the session ends.
    body = stack.execute(budget_session, "'A' * (64 << 20)", timeout_s=120)
    assert body["status"] == "succeeded", body
    assert body["result"] == {"text/plain": "'" + "A" * 4095}
    assert body["result_truncated"] is True
    assert body["output_notes"] == [
        f"result: text/plain cut to 4096 of {(64 << 20) + 2} characters (max_output)"
    ]
    record = stored(stack, body["id"])
    assert record["result"] == body["result"] and record["result_truncated"] is True
    assert record["output_notes"] == body["output_notes"]
