"""/openapi.json describes every route: /v1 and the dynamic-sessions routes, their errors in the
one error shape, the bearer key, and response schemas that match what the views answer."""

from __future__ import annotations

import re

import pytest
from flask import Flask

from api import dynamic_shapes as shapes
from api import dynamic_spec
from api.openapi import ERROR_STATUSES, Error
from shoal.executions import new_record
from shoal.use_cases import pools as pool_cases
from tests.unit.fakes import unit_app, unit_context, unit_settings

# Outside the API document: health, metrics, the docs page, and the MCP endpoint (JSON-RPC: its
# contract is the MCP specification, and it describes its tools itself, in tools/list).
UNDOCUMENTED = {
    "static",
    "health.healthz",
    "health.prometheus_metrics",
    "docs.page",
    "docs.asset",
    "mcp.endpoint",
}


@pytest.fixture(scope="module")
def app() -> Flask:
    return unit_app()


@pytest.fixture(scope="module")
def spec(app: Flask) -> dict:
    return app.test_client().get("/openapi.json").get_json()


def routes(app: Flask) -> set[tuple[str, str]]:
    """(method, OpenAPI path) of every route the app serves, but the API document's own and
    those outside the API (health, metrics)."""
    found = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint in UNDOCUMENTED or rule.endpoint.startswith("api-docs."):
            continue
        path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule.rule)
        found |= {(m.lower(), path) for m in rule.methods or () if m not in ("HEAD", "OPTIONS")}
    return found


def operations(spec: dict) -> dict[tuple[str, str], dict]:
    return {
        (method, path): operation
        for path, item in spec["paths"].items()
        for method, operation in item.items()
        if method != "parameters"
    }


def test_every_route_is_documented_the_dynamic_sessions_ones_too(app: Flask, spec: dict) -> None:
    documented = set(operations(spec))
    assert routes(app) == documented
    dynamic = {(m, p) for m, p in documented if p.startswith("/pools/{pool}/")}
    assert len(dynamic) == len(dynamic_spec.operations(unit_settings())) == 17
    assert ("post", "/pools/{pool}/executions") in dynamic


def test_every_operation_lists_its_errors_in_the_error_shape(spec: dict) -> None:
    for (method, path), operation in operations(spec).items():
        responses = operation["responses"]
        assert "422" not in responses, (method, path)  # Shoal answers 400 (api/errors.py)
        for status in ERROR_STATUSES:
            assert responses[str(status)] == {"$ref": f"#/components/responses/Error{status}"}
        assert responses["default"] == {"$ref": "#/components/responses/DEFAULT_ERROR"}
        assert any(s.startswith("2") for s in responses), (method, path)
    components = spec["components"]
    for name in [f"Error{s}" for s in ERROR_STATUSES] + ["DEFAULT_ERROR"]:
        content = components["responses"][name]["content"]["application/json"]
        assert content["schema"] == {"$ref": "#/components/schemas/Error"}
    assert components["responses"]["Error429"]["headers"]["Retry-After"]
    assert components["responses"]["Error404"]["headers"]["x-ms-error-code"]
    assert components["headers"]["x-ms-error-code"]["required"] is True
    error = components["schemas"]["Error"]
    assert error["required"] == ["error"] and error["additionalProperties"] is False
    info = components["schemas"]["ErrorInfo"]
    assert sorted(info["required"]) == ["code", "message"]
    assert info["additionalProperties"] is False


def test_an_error_answer_matches_the_error_schema(app: Flask) -> None:
    client = app.test_client()
    for response in (
        client.get("/v1/sessions"),
        client.get("/pools/default/session?identifier=x"),
        client.get("/nowhere"),
    ):
        assert response.status_code in (401, 404)
        assert Error().validate(response.get_json()) == {}


def test_the_key_is_a_bearer_token_on_every_operation(spec: dict) -> None:
    scheme = spec["components"]["securitySchemes"]["bearerAuth"]
    assert scheme == {**scheme, "type": "http", "scheme": "bearer"}
    assert spec["security"] == [{"bearerAuth": []}]


def test_dynamic_parameters_and_bodies_are_described(spec: dict) -> None:
    paths = spec["paths"]
    execute = paths["/pools/{pool}/executions"]["post"]
    names = {p["name"]: p for p in execute["parameters"]}
    assert names["identifier"]["required"] is True
    assert names["identifier"]["schema"]["pattern"] == dynamic_spec.IDENTIFIER.pattern
    assert set(names) == {"api-version", "identifier", "Idempotency-Key"}
    body = execute["requestBody"]["content"]["application/json"]["schema"]
    assert {"code", "shellCommand", "timeoutInSeconds", "outputStreamsMaxLength"} <= set(
        body["properties"]
    )
    assert body["properties"]["timeoutInSeconds"]["maximum"] == unit_settings().max_timeout_s
    assert set(execute["responses"]["202"]["headers"]) == {"operation-id", "Operation-Location"}
    upload = paths["/pools/{pool}/files"]["post"]["requestBody"]["content"]
    assert upload["multipart/form-data"]["schema"]["required"] == ["file"]
    download = paths["/pools/{pool}/files/{name}/content"]["get"]["responses"]["200"]
    assert "application/octet-stream" in download["content"]
    assert {p["name"] for p in paths["/pools/{pool}/files/{name}"]["parameters"]} == {
        "pool",
        "name",
    }
    legacy = paths["/pools/{pool}/code/execute"]["post"]["requestBody"]["content"]
    assert legacy["application/json"]["schema"]["required"] == ["properties"]


def test_v1_streamed_bodies_are_described(spec: dict) -> None:
    files = spec["paths"]["/v1/sessions/{session_id}/files/{path}"]
    assert "application/octet-stream" in files["put"]["requestBody"]["content"]
    assert "application/octet-stream" in files["get"]["responses"]["200"]["content"]
    multipart = spec["paths"]["/v1/sessions/{session_id}/files"]["post"]["requestBody"]
    assert multipart["content"]["multipart/form-data"]["schema"]["required"] == ["file"]


def record(**changes) -> dict:
    r = new_record({"id": "ses_1", "tenant": "t", "host": "h"}, "x", "python", 60, 4096, 1)
    r.update({"status": "succeeded", "duration_ms": 3.4, "finished_at": 1.0, **changes})
    return r


FILE = {"path": "a/b.csv", "name": "b.csv", "type": "file", "size": 3, "mtime": 1.5}
FOLDER = {"path": "a", "name": "a", "type": "directory", "size": 4096, "mtime": 1.5}
ENTRY = {"identifier": "chat-1", "id": "ses_1", "created_at": "1.0", "last_used_at": "2.5"}


@pytest.mark.parametrize(
    "schema, answer",
    [
        (dynamic_spec.LegacyExecution, shapes.legacy_execution(record(
            result={"text/plain": "4"}))),
        (dynamic_spec.LegacyExecution, shapes.legacy_execution(record(
            result={"text/plain": "None"}))),
        (dynamic_spec.LegacyExecution, shapes.legacy_execution(record(
            status="failed", error={"name": "E", "value": "v", "traceback": "tb"},
            output_notes=["result: cut"], result_truncated=True))),
        (dynamic_spec.LegacyExecution, shapes.legacy_execution(record(
            outputs=[{"type": "display", "data": {"image/png": "iVBOR"}}]))),
        (dynamic_spec.CurrentExecution, shapes.current_execution(record(), "i", "Synchronous")),
        (dynamic_spec.CurrentExecution, shapes.current_execution(
            record(status="queued", finished_at=None, duration_ms=None), "i", "Asynchronous")),
        (dynamic_spec.CurrentExecution, shapes.current_execution(
            record(language="shell", exit_code=3, status="failed"), "i", "Synchronous")),
        (dynamic_spec.LegacyFileList, {"$id": "1", "value": [shapes.legacy_file(FILE)]}),
        (dynamic_spec.LegacyFileList, shapes.legacy_file_list([FILE, FOLDER])),
        (dynamic_spec.CurrentFile, shapes.current_file(FILE)),
        (dynamic_spec.CurrentFile, shapes.current_file(FOLDER)),
        (dynamic_spec.CurrentFileList, shapes.current_file_list([FILE, FOLDER])),
        (dynamic_spec.IdentifierSession, shapes.session_view(ENTRY)),
        (dynamic_spec.ManagementSession, shapes.session_view(ENTRY, "expiresAt")),
        (dynamic_spec.IdentifierSessionList, {"sessions": [shapes.session_view(ENTRY)]}),
        (dynamic_spec.ManagementSessionList,
         {"value": [shapes.session_view(ENTRY, "expiresAt")], "count": 1, "nextLink": None}),
    ],
)  # fmt: skip
def test_the_dynamic_response_schemas_match_the_shapes(schema, answer: dict) -> None:
    """Each documented schema takes what api/dynamic_shapes.py makes: every field it sends, of
    the documented type, and no other (the schemas are strict)."""
    assert schema().validate(answer) == {}


def test_the_metadata_schema_matches_the_answer() -> None:
    c = unit_context()
    answer = pool_cases.pool_metadata(c, "default")
    assert dynamic_spec.PoolMetadata().validate(answer) == {}
