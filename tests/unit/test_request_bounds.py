"""The size of a request (api/request_bounds.py, api/json_bounds.py), at the WSGI level on
fakeredis: long URLs are 414, large headers 431, bodies over their route's limit 413 before they
are read, JSON nested too deeply 400, all in the error shape. tests/unit/test_server_layer.py
runs the same requests through a real gunicorn."""

from __future__ import annotations

import gc
import io
import json
import tracemalloc

import pytest
from flask import Flask
from werkzeug.test import EnvironBuilder

from api import request_bounds
from api.json_bounds import (
    MAX_JSON_DEPTH,
    MAX_JSON_NUMBER_DIGITS,
    MAX_JSON_VALUES,
    check_json_shape,
)
from api.request_bounds import (
    JSON_BODY_FLOOR,
    MAX_HEADER_BYTES,
    MAX_HEADER_FIELDS,
    MAX_TARGET_BYTES,
    batch_body_limit,
    json_body_limit,
)
from shoal import batches, tenants
from shoal.errors import PayloadTooLarge, ValidationFailed
from shoal.protocol import MAX_CODE_BYTES
from tests.unit.fakes import live_session, unit_app, unit_settings

JSON_TYPE = {"Content-Type": "application/json"}


@pytest.fixture()
def app() -> Flask:
    return unit_app()


@pytest.fixture()
def key(app: Flask) -> str:
    return tenants.create_key(app.extensions["shoal"].redis, "t1")[1]


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **JSON_TYPE}


def assert_error(response, status: int, code: str, *words: str) -> str:
    assert response.status_code == status, response.get_data(as_text=True)[:300]
    body = response.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code
    assert response.headers["x-ms-error-code"] == code
    for word in words:
        assert word in body["error"]["message"], (word, body)
    return body["error"]["message"]


def post_chunked(app: Flask, path: str, stream, headers: dict[str, str] | None = None):
    """A POST whose body has no Content-Length, as gunicorn hands a chunked body to the app."""
    environ = EnvironBuilder(path=path, method="POST", headers=headers or JSON_TYPE).get_environ()
    environ.pop("CONTENT_LENGTH", None)
    environ["wsgi.input"] = stream
    environ["wsgi.input_terminated"] = True
    environ["HTTP_TRANSFER_ENCODING"] = "chunked"
    return app.response_class.from_app(app, environ)


# --- URL and headers ---------------------------------------------------------------------------
def test_a_5000_character_path_is_json_414(app: Flask) -> None:
    client = app.test_client()
    assert_error(client.get("/" + "a" * 5000), 414, "URITooLong", str(MAX_TARGET_BYTES))
    assert_error(
        client.post("/pools/default/executions?identifier=" + "a" * 5000, json={}),
        414,
        "URITooLong",
    )
    assert_error(client.get("/v1/sessions?x=" + "q" * MAX_TARGET_BYTES), 414, "URITooLong")


def test_a_url_at_the_limit_reaches_the_route(app: Flask) -> None:
    path = "/" + "a" * (MAX_TARGET_BYTES - 1)
    assert_error(app.test_client().get(path), 404, "NotFound")


def test_large_headers_are_json_431(app: Flask) -> None:
    client = app.test_client()
    big = client.get("/healthz", headers={"X-Big": "b" * MAX_HEADER_BYTES})
    assert_error(big, 431, "RequestHeaderFieldsTooLarge", str(MAX_HEADER_BYTES))
    many = {f"X-H{i}": "1" for i in range(MAX_HEADER_FIELDS + 1)}
    assert_error(client.get("/healthz", headers=many), 431, "RequestHeaderFieldsTooLarge", "fields")
    fine = {f"X-H{i}": "1" for i in range(MAX_HEADER_FIELDS - 5)}
    assert client.get("/healthz", headers=fine).status_code != 431


def test_unknown_route_and_wrong_method_are_json(app: Flask) -> None:
    client = app.test_client()
    assert_error(client.get("/nowhere"), 404, "NotFound")
    response = client.post("/healthz")
    assert_error(response, 405, "MethodNotAllowed")
    assert "GET" in response.headers["Allow"]


def test_dynamic_sessions_routes_keep_their_codes(app: Flask, key: str) -> None:
    client = app.test_client()
    deep = "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1)
    response = client.post("/pools/default/executions?identifier=x", data=deep, headers=auth(key))
    assert_error(response, 400, "SessionRequestValidationFailed", "nested too deeply")
    response = client.post(
        "/pools/default/executions?identifier=bad/id", json={"code": "1"}, headers=auth(key)
    )
    assert_error(response, 400, "SessionRequestValidationFailed", "identifier")


# --- body size ---------------------------------------------------------------------------------
def test_json_limit_is_never_below_the_largest_valid_request() -> None:
    assert JSON_BODY_FLOOR >= 6 * MAX_CODE_BYTES
    assert json_body_limit(unit_settings(max_json_body_bytes=4 << 20)) == JSON_BODY_FLOOR
    assert json_body_limit(unit_settings(max_json_body_bytes=1)) == JSON_BODY_FLOOR
    assert json_body_limit(unit_settings(max_json_body_bytes=64 << 20)) == 64 << 20
    assert batch_body_limit(unit_settings()) == 16 << 20
    assert batch_body_limit(unit_settings(max_batch_body_bytes=1)) == JSON_BODY_FLOOR


def test_the_largest_valid_execution_request_is_accepted(app: Flask, key: str) -> None:
    """Code at MAX_CODE_BYTES of control characters, each escaped to six bytes (\\u0001)."""
    entry = live_session(app.extensions["shoal"])
    code = "\x01" * MAX_CODE_BYTES
    body = json.dumps(
        {
            "code": code,
            "language": "python",
            "timeout_s": 220,
            "wait": False,
            "max_output": 1 << 20,
            "callback_url": None,
        }
    ).encode()
    assert len(body) > 6 * MAX_CODE_BYTES
    response = app.test_client().post(
        f"/v1/sessions/{entry['id']}/executions", data=body, headers=auth(key)
    )
    assert response.status_code == 202, response.get_data(as_text=True)[:300]
    assert response.get_json()["status"] == "queued"


def test_a_content_length_over_the_limit_is_413_before_the_body_is_read(app: Flask) -> None:
    limit = json_body_limit(app.extensions["shoal"].settings)
    stream = io.BytesIO(b"[" * (limit + 1))
    response = app.test_client().post(
        "/v1/sessions/ses_0/executions", input_stream=stream, headers=JSON_TYPE
    )
    assert_error(response, 413, "PayloadTooLarge", str(limit), str(limit + 1))
    assert stream.tell() == 0, "the body was read"


def test_batches_have_their_own_limit(app: Flask, key: str) -> None:
    settings = app.extensions["shoal"].settings
    json_limit, batch_limit = json_body_limit(settings), batch_body_limit(settings)
    client = app.test_client()
    # Between the two limits: too large for an execution, not for a batch.
    body = b'{"items": [{"code": "' + b"x" * (json_limit + 1) + b'"}], "pool": "nope"}'
    assert_error(
        client.post("/v1/sessions/ses_0/executions", data=body, headers=auth(key)),
        413,
        "PayloadTooLarge",
    )
    response = client.post("/v1/batches", data=body, headers=auth(key))
    assert response.status_code != 413, response.get_data(as_text=True)[:300]
    over = io.BytesIO(b" " * (batch_limit + 1))
    response = client.post("/v1/batches", input_stream=over, headers=auth(key))
    assert_error(response, 413, "PayloadTooLarge", str(batch_limit))


def test_uploads_keep_their_streamed_limit(app: Flask, key: str) -> None:
    entry = live_session(app.extensions["shoal"])
    cap = app.extensions["shoal"].settings.max_upload_bytes
    over = io.BytesIO(b"\0" * (cap + (2 << 20)))
    response = app.test_client().put(
        f"/v1/sessions/{entry['id']}/files/big.bin",
        input_stream=over,
        headers={"Authorization": auth(key)["Authorization"]},
    )
    assert_error(response, 413, "PayloadTooLarge", str(cap))
    assert over.tell() == 0


def test_a_chunked_body_is_cut_off_at_the_limit(app: Flask) -> None:
    limit = batch_body_limit(app.extensions["shoal"].settings)
    stream = io.BytesIO(b"[" * (limit + (4 << 20)))
    response = post_chunked(app, "/v1/batches", stream)
    assert_error(response, 413, "PayloadTooLarge", str(limit))
    assert stream.tell() <= limit + (1 << 20), "read well past the limit"


def test_a_chunked_body_of_exactly_the_limit_is_read(app: Flask, key: str) -> None:
    limit = batch_body_limit(app.extensions["shoal"].settings)
    body = b'{"items": [], "pad": "' + b"x" * (limit - 24) + b'"}'
    assert len(body) == limit
    response = post_chunked(app, "/v1/batches", io.BytesIO(body), auth(key))
    assert_error(response, 400, "ValidationFailed", "pad")


# --- JSON structure ------------------------------------------------------------------------------
def nested(depth: int) -> bytes:
    return (
        b'{"a": ' * (depth // 2)
        + b"[" * (depth - depth // 2)
        + b"1"
        + (b"]" * (depth - depth // 2) + b"}" * (depth // 2))
    )


def test_depth_up_to_the_limit_passes_and_beyond_is_400() -> None:
    check_json_shape(nested(MAX_JSON_DEPTH))
    json.loads(nested(MAX_JSON_DEPTH))
    with pytest.raises(ValidationFailed, match="nested too deeply"):
        check_json_shape(nested(MAX_JSON_DEPTH + 1))
    with pytest.raises(ValidationFailed, match="nested too deeply"):
        check_json_shape(b"[" * 100_000)


def test_brackets_and_quotes_inside_strings_do_not_count() -> None:
    code = '[{"a": [1, 2]}] ' * 20_000 + '\\" \\\\' + "{[" * 1000
    body = json.dumps({"code": code, "x": ["\\", '"', "]"]}).encode()
    check_json_shape(body)
    check_json_shape(json.dumps({"code": code}, ensure_ascii=False).encode())


def test_too_many_values_is_413() -> None:
    check_json_shape(b"[" + b"0," * (MAX_JSON_VALUES - 2) + b"0]")
    with pytest.raises(PayloadTooLarge, match=str(MAX_JSON_VALUES)):
        check_json_shape(b"[" + b"0," * MAX_JSON_VALUES + b"0]")
    with pytest.raises(PayloadTooLarge):
        check_json_shape(b"[" + b"[]," * MAX_JSON_VALUES + b"[]]")
    with pytest.raises(PayloadTooLarge):
        check_json_shape(b"[" + b'"ab",' * MAX_JSON_VALUES + b'""]')


def test_a_full_batch_fits_the_value_bound() -> None:
    """The bound's reason: 1,000 items with every field, 20 patterns and 100 files each."""
    item = {
        "code": "print(1)",
        "language": "python",
        "timeout_s": 10,
        "max_output": 100,
        "files": {f"f{i}.txt": "" for i in range(100)},
        "collect": [f"*.{i}" for i in range(batches.MAX_COLLECT_PATTERNS)],
        "session_id": None,
    }
    body = {"pool": "default", "items": [item] * batches.MAX_ITEMS, "max_parallel": 8}
    check_json_shape(json.dumps(body).encode())


def test_a_number_of_too_many_digits_is_400_and_never_500(app: Flask, key: str) -> None:
    """Python's JSON parser refuses an integer of over 4,300 digits with a ValueError of its
    own, which was a 500 on /v1 and "must be a JSON object" on /pools (found probing the edge
    cases the fuzzing run, tests/integration/test_api_fuzz.py, does not generate). The scan
    refuses it first, on every JSON route."""
    check_json_shape(b'{"timeout_s": ' + b"9" * MAX_JSON_NUMBER_DIGITS + b"}")
    check_json_shape(json.dumps({"code": "1" * 10_000, "x": 1.5e300}).encode())  # text
    with pytest.raises(ValidationFailed, match="digits"):
        check_json_shape(b"[" + b"9" * (MAX_JSON_NUMBER_DIGITS + 1) + b"]")
    huge = b"1" + b"0" * 5000
    entry = live_session(app.extensions["shoal"], "t1")
    client = app.test_client()
    for path, body, code in [
        (f"/v1/sessions/{entry['id']}/executions", b'{"code": "1", "timeout_s": ' + huge + b"}",
         "ValidationFailed"),
        ("/v1/batches", b'{"items": [{"code": "1", "max_output": ' + huge + b"}]}",
         "ValidationFailed"),
        ("/pools/default/executions?identifier=x", b'{"code": "1", "timeoutInSeconds": ' + huge
         + b"}", "SessionRequestValidationFailed"),
    ]:  # fmt: skip
        response = client.post(path, data=body, headers=auth(key))
        assert_error(response, 400, code, f"more than {MAX_JSON_NUMBER_DIGITS} digits")


def test_nested_bodies_are_400_or_413_and_never_500(app: Flask, key: str) -> None:
    client = app.test_client()
    for body in (b"[" * 5000, b"[" * 5000 + b"]" * 5000, b'{"a":' * 3000, nested(200)):
        response = client.post("/v1/batches", data=body, headers=auth(key))
        assert_error(response, 400, "ValidationFailed", "nested too deeply")
    response = client.post("/v1/sessions", data=b"[" * (2 << 20), headers=auth(key))
    assert_error(response, 413, "PayloadTooLarge", "too many values")


def test_json_bombs_cost_the_api_no_memory(app: Flask, key: str) -> None:
    """A few bombs and oversized bodies: what the API allocates for each is bounded by its
    route's limit (a body refused by its Content-Length costs nothing), and none of it stays."""
    settings = app.extensions["shoal"].settings
    json_limit, batch_limit = json_body_limit(settings), batch_body_limit(settings)
    client = app.test_client()
    bomb = b"[" * (20 << 20)
    wide = b'{"items": [' + b"[]," * (json_limit // 3 - 6) + b"[]]}"
    deep_strings = b"[" * 100 + b'"' + b"x" * (json_limit - 300) + b'"' + b"]" * 100
    cases = [
        # (route, body stream, chunked, the most the API may allocate for it)
        ("/v1/batches", io.BytesIO(bomb), False, 1 << 20),
        ("/v1/batches", io.BytesIO(bomb), True, 3 * batch_limit),
        ("/v1/sessions/ses_0/executions", io.BytesIO(wide), False, 4 * json_limit),
        ("/v1/sessions/ses_0/executions", io.BytesIO(deep_strings), False, 4 * json_limit),
        ("/v1/batches", io.BytesIO(b"[" * 60_000), False, 1 << 20),
    ]
    expected = [413, 413, 413, 400, 400]
    client.get("/healthz")  # first-request allocations happen outside the measurement
    gc.collect()
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        peaks = []
        for (path, stream, chunked, _), status in zip(cases, expected, strict=True):
            tracemalloc.reset_peak()
            if chunked:
                response = post_chunked(app, path, stream, auth(key))
            else:
                response = client.post(path, input_stream=stream, headers=auth(key))
            assert response.status_code == status, response.get_data(as_text=True)[:300]
            del response
            peaks.append(tracemalloc.get_traced_memory()[1] - baseline)
        gc.collect()
        left = tracemalloc.get_traced_memory()[0] - baseline
    finally:
        tracemalloc.stop()
    for (path, _, chunked, most), peak in zip(cases, peaks, strict=True):
        assert peak < most, f"{path} (chunked {chunked}) cost {peak} bytes; at most {most}"
    assert left < 1 << 20, f"{left} bytes still held after the requests"


def test_the_hook_runs_before_authentication(app: Flask) -> None:
    assert app.before_request_funcs[None][0] is request_bounds.bound_request
    response = app.test_client().post(
        "/v1/batches", input_stream=io.BytesIO(b"[" * (20 << 20)), headers=JSON_TYPE
    )
    assert_error(response, 413, "PayloadTooLarge")


def test_every_upload_route_is_marked(app: Flask) -> None:
    marked = {
        endpoint
        for endpoint, view in app.view_functions.items()
        if getattr(view, "shoal_body", None) == request_bounds.UPLOAD
    }
    assert marked == {
        "v1_files.put_file",
        "v1_files.post_file",
        "dynamic_sessions.upload",
        "dynamic_sessions.legacy_upload",
    }
    assert app.view_functions["v1_batches.create_batch"].shoal_body == request_bounds.BATCH


def test_a_lone_surrogate_escape_is_400_and_pairs_or_escaped_text_pass(
    app: Flask, key: str
) -> None:
    """The guest's frames are UTF-8: code holding a surrogate without its pair could not reach
    it, so it is refused at the door, not failed on the host."""
    entry = live_session(app.extensions["shoal"])
    for code in ("print('\ud83d\ude00')", "print('\\ud800')"):
        check_json_shape(json.dumps({"code": code}).encode())
    for body in (b'{"code": "\\ud800"}', b'{"code": "x\\udc00\\ud800"}'):
        response = app.test_client().post(
            f"/v1/sessions/{entry['id']}/executions",
            data=body,
            headers={**auth(key), "Content-Type": "application/json"},
        )
        assert response.status_code == 400, response.get_data(as_text=True)
        assert "surrogate" in response.get_json()["error"]["message"]
