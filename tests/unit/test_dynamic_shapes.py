"""The dynamic-sessions response shapes, from records (pure functions)."""

from __future__ import annotations

from api import dynamic_shapes as shapes
from shoal.executions import new_record


def record(**changes) -> dict:
    session = {"id": "ses_1", "tenant": "t", "host": "h"}
    r = new_record(session, "x", "python", 60, 4096, 1)
    r.update({"status": "succeeded", "duration_ms": 3.4, "finished_at": 1.0, **changes})
    return r


def test_legacy_result_is_json_value_when_it_is_one() -> None:
    assert shapes.legacy_result(record(result={"text/plain": "42"})) == 42
    assert shapes.legacy_result(record(result={"text/plain": "'abc'"})) == "abc"
    # Containers stay text: AutoGen parses a list result by splitting its repr.
    assert shapes.legacy_result(record(result={"text/plain": "[1, 2.5, None]"})) == "[1, 2.5, None]"
    assert shapes.legacy_result(record(result={"text/plain": "nan"})) == "nan"
    assert shapes.legacy_result(record(result={"text/plain": "<object at 0x1>"})) == (
        "<object at 0x1>"
    )
    assert shapes.legacy_result(record(result=None)) == ""


def test_legacy_image_result() -> None:
    figure = {"type": "display", "data": {"image/png": "iVBOR", "text/plain": "<Figure>"}}
    body = shapes.legacy_execution(record(outputs=[figure]))
    assert body["properties"]["result"] == {
        "type": "image",
        "format": "png",
        "base64_data": "iVBOR",
    }


def test_failure_is_200_shape_with_traceback_in_stderr() -> None:
    error = {"name": "ZeroDivisionError", "value": "division by zero", "traceback": "Traceback…"}
    body = shapes.legacy_execution(record(status="failed", error=error))
    assert body["properties"]["status"] == "Failure"
    assert "Traceback" in body["properties"]["stderr"]
    assert body["$id"] == "1" and body["properties"]["$id"] == "2"


def test_current_statuses_and_execution_result() -> None:
    ok = shapes.current_execution(record(result={"text/plain": "nan"}), "abc", "Synchronous")
    assert ok["status"] == "Succeeded" and ok["result"]["executionResult"] == "nan"
    none = shapes.current_execution(record(result=None), "abc", "Synchronous")
    assert none["result"]["executionResult"] is None
    for status, expected in [("queued", "NotStarted"), ("running", "Running"),
                             ("timed_out", "Failed"), ("lost", "Failed"),
                             ("cancelled", "Canceled")]:  # fmt: skip
        assert shapes.current_execution(record(status=status), "a", "x")["status"] == expected


def test_shell_status_is_the_exit_code() -> None:
    body = shapes.current_execution(record(language="shell", exit_code=3), "a", "Synchronous")
    assert body["status"] == "3"


def test_file_shapes() -> None:
    info = {"path": "d/data.csv", "name": "data.csv", "type": "file", "size": 16, "mtime": 0.5}
    legacy = shapes.legacy_file_list([info])
    assert legacy["value"][0]["properties"]["filename"] == "d/data.csv"
    assert legacy["value"][0]["properties"]["size"] == 16
    current = shapes.current_file(info)
    assert current["type"] == "File" and current["contentType"] == "text/csv"
    assert current["lastModifiedAt"].startswith("1970-01-01T00:00:00.5")
