"""The output bounds (shoal/protocol.py bound_answer) as pure functions, and where the host keeps
what they say: the execution record, the /v1 view and the dynamic-sessions shapes. The real
agent and the client against a hostile guest are in test_agent.py."""

from __future__ import annotations

import base64
import copy
import time

from api import dynamic_shapes as shapes
from shoal import executions, protocol
from shoal.settings import Settings
from tests.unit.test_vm import OK_ANSWER, make_vm, read_request

BUDGET = protocol.DEFAULT_RICH_OUTPUT_BYTES


def answer(**changes) -> dict:
    return {**copy.deepcopy(OK_ANSWER), **changes}


def test_a_small_answer_is_left_as_it_is_without_copies() -> None:
    result = {"text/plain": "2"}
    outputs_data = {"text/plain": "<Figure>", "image/png": "iVBORw0KGgo="}
    small = answer(result=result, outputs=[{"type": "display", "data": outputs_data}])
    bounded = protocol.bound_answer(small, 4096, BUDGET)
    assert bounded["result"] is result  # measured, not copied or re-encoded
    assert bounded["outputs"][0]["data"] is outputs_data
    assert "truncated" not in bounded["outputs"][0]
    assert (bounded["result_truncated"], bounded["outputs_truncated"]) == (False, False)
    assert bounded["output_notes"] == []


def test_bounds_are_idempotent() -> None:
    """What the guest bounded, the host finds within bounds: it changes nothing again."""
    image = base64.b64encode(b"\x89PNG" + bytes(5000)).decode()
    raw = answer(
        stdout="s" * 50,
        result={"text/plain": "r" * 50, "application/json": {"k": "v" * 40}},
        outputs=[{"type": "display", "data": {"image/png": image, "text/html": "h" * 99}}] * 3,
        error={"name": "E", "value": "v" * 40_000, "traceback": "t" * 300_000},
    )
    once = protocol.bound_answer(copy.deepcopy(raw), 20, 12_000)
    assert once["result"] == {"text/plain": "r" * 20}
    assert [("image/png" in o["data"]) for o in once["outputs"]] == [True, True, False]
    assert len(once["error"]["value"]) <= protocol.MAX_ERROR_VALUE
    assert protocol.bound_answer(copy.deepcopy(once), 20, 12_000) == once


def test_the_interpreters_raw_values_are_measured_before_they_are_encoded() -> None:
    notes: list[str] = []
    png = b"\x89PNG" + bytes(996)
    data = {"image/png": png, "text/plain": b"caf\xc3\xa9"}
    bundle, cost, cut = protocol.bound_bundle(data, "result", 10, 2000, notes)
    assert base64.b64decode(bundle["image/png"]) == png and bundle["text/plain"] == "café"
    assert (cost, cut, notes) == (1004, False, [])
    bundle, cost, cut = protocol.bound_bundle(data, "result", 10, 999, notes)
    assert bundle == {"text/plain": "café"} and cut is True
    assert notes == [
        "result: image/png of 1000 bytes dropped: 999 of the rich-output budget was left"
    ]
    assert protocol.base64_size(base64.b64encode(bytes(1001)).decode()) == 1001


def test_notes_are_bounded_and_say_when_there_were_more() -> None:
    outputs = [{"type": "display", "data": {"text/plain": "x" * 100}}] * 40
    bounded = protocol.bound_answer(answer(outputs=outputs), 10, BUDGET)
    assert all(o["truncated"] is True for o in bounded["outputs"])
    notes = bounded["output_notes"]
    assert len(notes) == protocol.MAX_NOTES and notes[-1] == protocol.MORE_NOTES


def test_bounding_a_typical_answer_is_cheap() -> None:
    """The hot path: a tiny cell's answer is bounded in microseconds (a len() per field)."""
    typical = answer(result={"text/plain": "42"})
    started = time.perf_counter()
    for _ in range(10_000):
        protocol.bound_answer(typical, 4096, BUDGET)
    assert (time.perf_counter() - started) / 10_000 < 50e-6


def test_the_record_and_its_views_carry_the_flags() -> None:
    session = {"id": "ses_1", "tenant": "t", "host": "h"}
    record = executions.new_record(session, "x", "python", 60, 10, 1)
    bounded = protocol.bound_answer(
        answer(result={"text/plain": "r" * 99}, outputs=[]), record["max_output"], BUDGET
    )
    executions.apply_agent_result(record, bounded)
    view = executions.public_view(record)
    assert view["result"] == {"text/plain": "r" * 10} and view["result_truncated"] is True
    assert view["outputs_truncated"] is False
    assert view["output_notes"] == ["result: text/plain cut to 10 of 99 characters (max_output)"]

    current = shapes.current_execution(record, "abc", "Synchronous")["result"]
    assert current["executionResult"] == "r" * 10 and current["executionResultTruncated"] is True
    assert current["outputNotes"] == view["output_notes"]
    legacy = shapes.legacy_execution(record)["properties"]
    assert legacy["resultTruncated"] is True and legacy["stdoutTruncated"] is False


def test_a_record_stored_before_the_flags_existed_still_renders() -> None:
    session = {"id": "ses_1", "tenant": "t", "host": "h"}
    old = executions.new_record(session, "x", "python", 60, 10, 1)
    for name in executions.LATER_FIELDS:
        del old[name]
    view = executions.public_view(old)
    assert (view["result_truncated"], view["outputs_truncated"], view["output_notes"]) == (
        False,
        False,
        [],
    )
    legacy = shapes.legacy_execution({**old, "status": "succeeded", "duration_ms": 1})
    assert legacy["properties"]["resultTruncated"] is False


def test_the_vm_sends_the_hosts_budget_and_bounds_the_answer() -> None:
    seen: list[dict] = []

    def guest(sock):
        request = read_request(sock)
        seen.append(request)
        oversized = {"text/plain": "r" * 5000, "image/png": base64.b64encode(bytes(3000)).decode()}
        sock.sendall(protocol.encode({**OK_ANSWER, "result": oversized, "id": request["id"]}))
        time.sleep(0.2)

    vm, _ = make_vm(guest)
    vm.settings = Settings(interrupt_grace_s=0.2, max_rich_output_bytes=2000)
    bounded = vm.execute("x", timeout_s=5, max_output=100)
    assert seen[0]["max_rich_output_bytes"] == 2000 and seen[0]["max_output"] == 100
    assert bounded["result"] == {"text/plain": "r" * 100} and bounded["result_truncated"] is True

    vm, _ = make_vm(guest)
    vm.settings = Settings(interrupt_grace_s=0.2, max_rich_output_bytes=1 << 40)
    vm.execute("x", timeout_s=5)
    assert seen[1]["max_rich_output_bytes"] == protocol.MAX_RICH_OUTPUT_BYTES  # clamped
