"""The tenant session cap (SHOAL_TENANT_MAX_SESSIONS, or a tenant's own), on fakeredis.

The integration stack runs with one cap for every test, so the 429 is checked here, at the front
door, with a cap of 2, and at the use case with many creates at once: the cap is checked and
taken in one step, so no interleaving of concurrent creates gets past it.
"""

from __future__ import annotations

import threading

import fakeredis
import pytest

from api.app import create_app
from shoal import keys, queue, replies, sessions, tenants
from shoal.errors import PoolExhausted, TenantSessionLimit
from shoal.pools import get_pool
from shoal.settings import Settings, load
from shoal.use_cases import sessions as session_cases
from tests.unit.fakes import (
    AnsweringCelery,
    SentTask,
    publish_heartbeat,
    unit_context,
    unit_settings,
)

CAP = 2


def host_creates(r):
    """The host's side of CREATE_SESSION when the VM comes up (workers/host.py)."""

    def answer(task: SentTask) -> None:
        session_id = task.kwargs["session_id"]
        sessions.activate(r, session_id, "vm_" + session_id, warm=True)
        replies.send(r, task.kwargs["reply_key"], {"ok": True})

    return answer


@pytest.fixture()
def app():
    settings = Settings(
        redis_url="redis://127.0.0.1:1/0", home="/tmp/shoal-unit", tenant_max_sessions=CAP
    )
    app = create_app(settings)
    c = app.extensions["shoal"]
    c.redis = fakeredis.FakeRedis(decode_responses=True)
    c.celery = AnsweringCelery()
    c.celery.answer(queue.CREATE_SESSION.name, host_creates(c.redis))
    publish_heartbeat(c.redis)
    yield app
    c.celery.join()


def auth(app, tenant: str) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {tenants.create_key(app.extensions['shoal'].redis, tenant)[1]}"
    }


def fill(app, tenant: str, n: int) -> list[dict]:
    c = app.extensions["shoal"]
    pool = get_pool(c.settings, "default")
    return [sessions.create(c.redis, tenant, pool, "h1") for _ in range(n)]


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.headers["x-ms-error-code"] == code
    error = response.get_json()["error"]
    assert error["code"] == code
    return error


def test_past_the_cap_is_429_with_retry_after_naming_the_setting(app) -> None:
    headers = auth(app, "acme")
    fill(app, "acme", CAP)
    response = app.test_client().post("/v1/sessions", json={}, headers=headers)
    error = assert_error(response, 429, "TenantSessionLimit")
    assert "SHOAL_TENANT_MAX_SESSIONS" in error["message"] and str(CAP) in error["message"]
    assert response.headers["Retry-After"] == "1"
    assert sessions.count_for_tenant(app.extensions["shoal"].redis, "acme") == CAP


def test_new_identifier_past_the_cap_is_429(app) -> None:
    headers = auth(app, "acme")
    fill(app, "acme", CAP)
    response = app.test_client().post(
        "/pools/default/executions?identifier=new-one", json={"code": "1"}, headers=headers
    )
    assert_error(response, 429, "TenantSessionLimit")
    assert int(response.headers["Retry-After"]) >= 1


def test_the_cap_is_per_tenant_and_freed_by_deleting(app) -> None:
    client = app.test_client()
    acme = auth(app, "acme")
    full = fill(app, "acme", CAP)
    # Another tenant is not limited by acme's sessions.
    created = client.post("/v1/sessions", json={}, headers=auth(app, "other"))
    assert created.status_code == 201, created.get_data(as_text=True)
    r = app.extensions["shoal"].redis
    sessions.end(r, full[0], sessions.DELETED)  # what DELETE does (no broker here for the rest)
    assert sessions.count_for_tenant(r, "acme") == CAP - 1
    again = client.post("/v1/sessions", json={}, headers=acme)
    assert again.status_code == 201, again.get_data(as_text=True)
    assert_error(client.post("/v1/sessions", json={}, headers=acme), 429, "TenantSessionLimit")


def creating_at_once(c, tenant: str, pool: str, n: int) -> tuple[list[dict], list[Exception]]:
    """`n` threads creating a session at the same moment: (made, refused)."""
    made: list[dict] = []
    refused: list[Exception] = []
    start = threading.Barrier(n)

    def create() -> None:
        start.wait()
        try:
            made.append(session_cases.create_session(c, tenant, pool))
        except (TenantSessionLimit, PoolExhausted) as exc:
            refused.append(exc)

    threads = [threading.Thread(target=create) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    return made, refused


def test_concurrent_creates_never_exceed_the_tenant_cap() -> None:
    c = unit_context(unit_settings(tenant_max_sessions=5), celery=AnsweringCelery())
    c.celery.answer(queue.CREATE_SESSION.name, host_creates(c.redis))
    publish_heartbeat(c.redis)
    made, refused = creating_at_once(c, "t1", "default", 40)
    c.celery.join()
    assert len(made) == 5 and len(refused) == 35
    assert all(isinstance(e, TenantSessionLimit) for e in refused)
    assert sessions.count_for_tenant(c.redis, "t1") == 5
    # Only the admitted ones reached a host; the refused registered nothing at all.
    assert len(c.celery.take(queue.CREATE_SESSION.name)) == 5
    assert len(c.redis.keys(keys.session("*"))) == 5


def test_concurrent_creates_never_exceed_a_tenants_own_cap_nor_the_pools(tmp_path) -> None:
    pools_file = tmp_path / "pools.toml"
    pools_file.write_text("[pools.small]\nmax_sessions = 3\n")
    c = unit_context(unit_settings(pools_file=str(pools_file)), celery=AnsweringCelery())
    c.celery.answer(queue.CREATE_SESSION.name, host_creates(c.redis))
    publish_heartbeat(c.redis)
    tenants.set_max_sessions(c.redis, "own", 2)  # below the default: the tenant's own wins
    made, refused = creating_at_once(c, "own", "default", 20)
    assert len(made) == 2 and sessions.count_for_tenant(c.redis, "own") == 2
    assert all(isinstance(e, TenantSessionLimit) for e in refused)

    made, refused = creating_at_once(c, "t2", "small", 20)
    c.celery.join()
    assert len(made) == 3 and sessions.count_for_pool(c.redis, "small") == 3
    assert all(isinstance(e, PoolExhausted) for e in refused)


def test_a_tenants_own_cap_may_be_above_the_default() -> None:
    c = unit_context(unit_settings(tenant_max_sessions=1), celery=AnsweringCelery())
    c.celery.answer(queue.CREATE_SESSION.name, host_creates(c.redis))
    publish_heartbeat(c.redis)
    tenants.set_max_sessions(c.redis, "big", 3)
    made, _ = creating_at_once(c, "big", "default", 6)
    c.celery.join()
    assert len(made) == 3


def test_a_create_that_cannot_be_sent_gives_its_place_back() -> None:
    class BrokerDown(AnsweringCelery):
        def send_task(self, name: str, **options):
            if name == queue.CREATE_SESSION.name:
                raise ConnectionError("the broker is down")
            super().send_task(name, **options)

    c = unit_context(unit_settings(tenant_max_sessions=1), celery=BrokerDown())
    publish_heartbeat(c.redis)
    for _ in range(3):  # each failure gives the one place back
        with pytest.raises(ConnectionError):
            session_cases.create_session(c, "t1", "default")
    assert sessions.count_for_tenant(c.redis, "t1") == 0
    assert sessions.count_for_pool(c.redis, "default") == 0


def test_the_default_cap_leaves_room_for_other_tenants() -> None:
    # Never above half a host's VMs: 24 of the default 48, and less on a smaller host.
    assert load({}).tenant_max_sessions == 24 == load({}).host_max_vms // 2
    assert load({"SHOAL_HOST_MAX_VMS": "10"}).tenant_max_sessions == 5
    assert load({"SHOAL_TENANT_MAX_SESSIONS": "100"}).tenant_max_sessions == 24
    assert load({"SHOAL_TENANT_MAX_SESSIONS": "3"}).tenant_max_sessions == 3
    assert load({"SHOAL_HOST_MAX_VMS": "1"}).tenant_max_sessions == 1
    with pytest.raises(SystemExit, match="SHOAL_TENANT_MAX_SESSIONS"):
        load({"SHOAL_TENANT_MAX_SESSIONS": "0"})
