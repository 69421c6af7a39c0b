"""Redis memory shared fairly (shoal/storage.py, docs/limits.md "Storage"), on fakeredis with the
real host runtime and scripted VMs: what a tenant's records, batches and webhook deliveries hold
is counted and let go when they expire; past its cap a tenant's next submission is refused with
429 TenantStorageFull (all tenants past their share: 503 StorageFull), admitting nothing, while
a result that takes it past the cap is still stored whole, and reads and deletes keep working;
/healthz reports the memory; the private Redis is started bounded and never evicting."""

from __future__ import annotations

import json
import time
from pathlib import Path

import fakeredis
import pytest

from api.app import create_app
from shoal import admin_keys, batches, executions, keys, leases, queue, storage, tenants, webhooks
from shoal.errors import StorageFull, TenantStorageFull
from shoal.settings import DEFAULT_REDIS_MAXMEMORY_CAP, load, physical_memory_bytes
from shoal.use_cases import batches as batch_cases
from shoal.use_cases import executions as execution_cases
from shoal.use_cases import sessions as session_cases
from tests.unit.fakes import (
    AnsweringCelery,
    FakeVMManager,
    RecordingCelery,
    live_session,
    ok_answer,
    publish_heartbeat,
    unit_context,
    unit_settings,
)
from workers.batch_runner import BatchRunner
from workers.host import HostRuntime

PARAMS = {"code": "print('x' * n)", "language": "python", "timeout_s": 5, "max_output": 1 << 20}
MIB = 1 << 20
BIG = 400_000  # characters of stdout: 3 such records pass a 1 MiB cap


class Host:
    """One host runtime on fakeredis whose VMs answer what each test scripts."""

    def __init__(self, **settings) -> None:
        self.c = unit_context(unit_settings(**settings), celery=AnsweringCelery())
        publish_heartbeat(self.c.redis)
        self.vms = FakeVMManager()
        self.runtime = HostRuntime(
            self.c.settings, r=self.c.redis, rb=self.c.redis_bin, vms=self.vms
        )
        self.c.celery.answer(queue.EXECUTE.name, lambda task: self.runtime.execute(**task.kwargs))

    def session(self, tenant: str = "t1") -> dict:
        entry = live_session(self.c, tenant)
        vm = self.vms.create("vm_" + entry["id"], None)
        self.runtime.session_vm[entry["id"]] = vm.vm_id
        self.c.redis.hset(keys.session(entry["id"]), "vm", vm.vm_id)
        return entry

    def run(self, entry: dict, stdout: int = 0) -> dict:
        """Submit through the use case; the host runs it; the final record as stored."""
        self.vms.get("vm_" + entry["id"]).answers.append(ok_answer() | {"stdout": "x" * stdout})
        record = execution_cases.run_execution(self.c, entry, PARAMS, wait=True)
        self.c.celery.join()
        return record

    def stored(self, execution_id: str) -> str:
        return self.c.redis.get(keys.execution(execution_id))


def held(c, tenant: str = "t1") -> int:
    return storage.held(c.redis, tenant)


def entries(c, tenant: str = "t1") -> dict[str, int]:
    sizes = c.redis.hgetall(keys.tenant_storage_sizes(tenant))
    return {member: int(size) for member, size in sizes.items()}


# --- what is counted -------------------------------------------------------------------------
def test_the_queued_record_is_counted_then_replaced_by_the_final_one() -> None:
    host = Host()
    del host.c.celery.answers[queue.EXECUTE.name]  # the host takes its task below
    entry = host.session()
    record = execution_cases.submit_execution(host.c, entry, PARAMS)
    queued = len(host.stored(record["id"])) + storage.ENTRY_OVERHEAD
    # Counted before its number is known: with room for one of SEQ_DIGITS digits.
    assert queued <= held(host.c) <= queued + executions.SEQ_DIGITS
    expiry = host.c.redis.zscore(keys.tenant_storage("t1"), "exec:" + record["id"])
    assert time.time() < expiry <= time.time() + host.c.settings.execution_ttl_s
    (task,) = host.c.celery.take(queue.EXECUTE.name)
    host.runtime.execute(**task.kwargs)
    host.c.celery.answer(queue.EXECUTE.name, lambda task: host.runtime.execute(**task.kwargs))

    final = host.stored(record["id"])
    assert json.loads(final)["status"] == executions.SUCCEEDED
    # A small final record also travels in its done list: counted twice while that lives.
    assert entries(host.c) == {
        "exec:" + record["id"]: len(final) + storage.ENTRY_OVERHEAD,
        "done:" + record["id"]: len(final) + storage.ENTRY_OVERHEAD,
    }
    assert held(host.c) == 2 * (len(final) + storage.ENTRY_OVERHEAD)
    done_expiry = host.c.redis.zscore(keys.tenant_storage("t1"), "done:" + record["id"])
    assert done_expiry <= time.time() + executions.DONE_TTL_S

    big = host.run(entry, stdout=BIG)
    body = host.stored(big["id"])
    assert len(body) > executions.INLINE_DONE_BYTES
    assert entries(host.c)["exec:" + big["id"]] == len(body) + storage.ENTRY_OVERHEAD
    assert "done:" + big["id"] not in entries(host.c)  # not inlined: nothing to count
    assert held(host.c) == sum(entries(host.c).values())
    assert storage.held_by_all(host.c.redis) == held(host.c)


def test_each_tenant_is_counted_apart_and_all_together() -> None:
    host = Host()
    host.run(host.session("t1"), stdout=BIG)
    host.run(host.session("t2"), stdout=BIG // 2)
    assert held(host.c, "t1") > BIG > held(host.c, "t2") > BIG // 2
    assert storage.held_by_all(host.c.redis) == held(host.c, "t1") + held(host.c, "t2")


def test_a_webhook_delivery_is_counted_with_its_body() -> None:
    c = unit_context()
    payload = {"id": "exe_1", "stdout": "y" * 50_000}
    webhooks.schedule(c.redis, c.celery, "exe_1", "t1", "https://example.com/h", payload, 600)
    stored = c.redis.get(keys.webhook_delivery("exe_1"))
    assert entries(c) == {"webhook:exe_1": len(stored) + storage.ENTRY_OVERHEAD}
    # Scheduled again (it never is): nothing changes, nothing is counted twice.
    webhooks.schedule(c.redis, c.celery, "exe_1", "t1", "https://example.com/h", {}, 600)
    assert c.redis.get(keys.webhook_delivery("exe_1")) == stored
    assert held(c) == len(stored) + storage.ENTRY_OVERHEAD


# --- over the cap ----------------------------------------------------------------------------
def test_past_its_cap_a_tenants_next_submission_is_refused_and_its_results_are_kept() -> None:
    host = Host()
    c = host.c
    tenants.set_limits(c.redis, "t1", max_redis_mib=1)
    entry = host.session()
    finals = [host.run(entry, stdout=BIG) for _ in range(3)]
    # The third was admitted below the cap and took the tenant past it: stored whole anyway.
    assert held(c) > MIB
    for final in finals:
        stored = json.loads(host.stored(final["id"]))
        assert stored["status"] == executions.SUCCEEDED and len(stored["stdout"]) == BIG
    c.celery.take(queue.EXECUTE.name)
    seq_before = c.redis.get(keys.session_seq(entry["id"]))
    records_before = len(c.redis.keys(keys.execution("exe_*[0-9a-f]")))

    with pytest.raises(TenantStorageFull, match="SHOAL_TENANT_MAX_REDIS_MIB") as refused:
        execution_cases.run_execution(c, entry, PARAMS, idempotency_key="k1", wait=True)
    assert refused.value.status == 429 and refused.value.code == "TenantStorageFull"
    # Retry-After: when the tenant's first record expires.
    assert c.settings.execution_ttl_s - 5 <= refused.value.retry_after_s
    assert refused.value.retry_after_s <= c.settings.execution_ttl_s
    assert f"{MIB}" in refused.value.message
    # Nothing admitted: no record, no number, no task, no idempotency key, no wait slot.
    assert c.redis.get(keys.session_seq(entry["id"])) == seq_before
    assert len(c.redis.keys(keys.execution("exe_*[0-9a-f]"))) == records_before
    assert c.celery.take(queue.EXECUTE.name) == []
    assert c.redis.get(keys.idempotency("t1", "k1")) is None
    assert c.redis.zcard(keys.tenant_waits("t1")) == 0
    assert not c.redis.zcard(keys.session_executions(entry["id"]))

    # Another tenant is not held back; the full one still reads and deletes.
    other = host.run(host.session("t2"), stdout=BIG)
    assert other["status"] == executions.SUCCEEDED
    assert executions.get_for_tenant(c.redis, "t1", finals[0]["id"])["stdout"] == "x" * BIG
    session_cases.delete_session(c, entry)

    # Its own larger cap lets it go on.
    tenants.set_limits(c.redis, "t1", max_redis_mib=4)
    assert host.run(host.session(), stdout=10)["status"] == executions.SUCCEEDED


def test_a_submission_that_alone_would_pass_the_cap_is_refused() -> None:
    host = Host()
    tenants.set_limits(host.c.redis, "t1", max_redis_mib=1)
    entry = host.session()
    huge = PARAMS | {"code": "#" * (MIB - 100)}
    with pytest.raises(TenantStorageFull):
        execution_cases.submit_execution(host.c, entry, huge)
    assert held(host.c) == 0


def test_all_tenants_past_their_share_get_503_storage_full() -> None:
    # maxmemory 4 MiB: all tenants may hold 80% of it, each tenant at most half of that.
    host = Host(redis_maxmemory_mib=4)
    assert host.c.settings.tenants_redis_bytes == 4 * MIB * 80 // 100
    assert host.c.settings.tenant_max_redis_mib == 1
    for tenant in ("t1", "t2", "t3", "t4"):  # each within its own cap
        storage.charge(host.c.redis, tenant, [("exec:held", 850_000, 3600)])
    with pytest.raises(StorageFull, match="SHOAL_REDIS_TENANTS_PCT") as refused:
        execution_cases.submit_execution(host.c, host.session("t5"), PARAMS)
    assert refused.value.status == 503 and refused.value.retry_after_s == storage.ALL_FULL_RETRY_S
    assert held(host.c, "t5") == 0


def test_the_api_answers_a_full_tenant_with_429_and_a_full_redis_with_503() -> None:
    settings = unit_settings(redis_maxmemory_mib=64)
    app = create_app(settings)
    c = app.extensions["shoal"]
    c.redis = fakeredis.FakeRedis(decode_responses=True)
    c.celery = RecordingCelery()
    client = app.test_client()
    headers = {"Authorization": f"Bearer {tenants.create_key(c.redis, 'acme')[1]}"}
    entry = live_session(c, "acme")
    tenants.set_limits(c.redis, "acme", max_redis_mib=1)
    storage.charge(c.redis, "acme", [("exec:old", MIB, 3000)])

    url = f"/v1/sessions/{entry['id']}/executions"
    for path, body in [
        (url, {"code": "1", "wait": False}),
        ("/v1/batches", {"items": [{"code": "1"}]}),
    ]:
        refused = client.post(path, json=body, headers=headers)
        assert refused.status_code == 429, refused.get_data(as_text=True)
        assert refused.get_json()["error"]["code"] == "TenantStorageFull"
        assert set(refused.get_json()["error"]) == {"code", "message"}
        assert refused.headers["x-ms-error-code"] == "TenantStorageFull"
        assert 2990 <= int(refused.headers["Retry-After"]) <= 3000
    assert leases.holders(c.redis, keys.tenant_batches("acme")) == 0  # its place given back
    assert not c.redis.keys(keys.batch("*"))
    # Reads still work.
    assert client.get(f"/v1/sessions/{entry['id']}", headers=headers).status_code == 200

    tenants.set_limits(c.redis, "acme", max_redis_mib=1000)
    storage.charge(c.redis, "others", [("exec:old", 60 * MIB, 3000)])
    refused = client.post(url, json={"code": "1", "wait": False}, headers=headers)
    assert refused.status_code == 503, refused.get_data(as_text=True)
    assert refused.headers["x-ms-error-code"] == "StorageFull"
    assert refused.headers["Retry-After"] == str(storage.ALL_FULL_RETRY_S)


# --- expiry ----------------------------------------------------------------------------------
def test_a_tenants_bytes_come_back_as_its_records_expire(monkeypatch) -> None:
    monkeypatch.setattr(executions, "DONE_TTL_S", 1)
    host = Host(execution_ttl_s=1)
    tenants.set_limits(host.c.redis, "t1", max_redis_mib=1)
    entry = host.session()
    for _ in range(3):
        host.run(entry, stdout=BIG)
    with pytest.raises(TenantStorageFull) as refused:
        execution_cases.submit_execution(host.c, entry, PARAMS)
    assert refused.value.retry_after_s == 1
    time.sleep(1.1)
    # The records are gone from Redis, and the next admission lets go of what they counted.
    assert host.c.redis.keys(keys.execution("exe_*[0-9a-f]")) == []
    record = host.run(entry, stdout=10)
    assert record["status"] == executions.SUCCEEDED
    assert set(entries(host.c)) == {"exec:" + record["id"], "done:" + record["id"]}
    assert held(host.c) == sum(entries(host.c).values()) < 10_000


def test_beats_sweep_lets_go_of_an_idle_tenants_expired_bytes_and_recounts() -> None:
    c = unit_context()
    storage.charge(c.redis, "idle", [("exec:a", 5000, 1), ("exec:b", 7000, 3600)])
    storage.charge(c.redis, "gone", [("exec:c", 9000, 3600)])
    storage.charge(c.redis, "busy", [("exec:d", 1000, 3600)])
    overhead = storage.ENTRY_OVERHEAD
    assert storage.held_by_all(c.redis) == 22_000 + 4 * overhead
    # A tenant whose counting keys are gone (their backstop TTL ran out) counts nothing.
    c.redis.delete(keys.tenant_storage("gone"), keys.tenant_storage_sizes("gone"))
    c.redis.hincrby(keys.storage_totals(), storage.ALL, 12_345)  # a count gone astray
    time.sleep(1.1)

    assert storage.sweep(c.redis) == 1
    assert held(c, "idle") == 7000 + overhead
    assert held(c, "gone") == 0 and c.redis.hget(keys.storage_totals(), "gone") is None
    assert storage.held_by_all(c.redis) == 8000 + 2 * overhead  # recounted from the tenants
    assert entries(c, "idle") == {"exec:b": 7000 + overhead}
    # The counting keys outlive their last entry's expiry, by at most the backstop.
    left = c.redis.zscore(keys.tenant_storage("idle"), "exec:b") - time.time()
    for key in (keys.tenant_storage("idle"), keys.tenant_storage_sizes("idle")):
        assert left <= c.redis.ttl(key) <= left + storage.BACKSTOP_S + 1


def test_a_sweep_is_bounded_and_the_next_one_goes_on() -> None:
    c = unit_context()
    storage.charge(c.redis, "t1", [(f"exec:{i}", 10, 1) for i in range(30)])
    time.sleep(1.1)
    assert storage.sweep(c.redis, limit=20) == 20
    assert storage.sweep(c.redis, limit=20) == 10
    assert held(c) == 0 and storage.held_by_all(c.redis) == 0
    assert not c.redis.exists(keys.tenant_storage("t1"), keys.storage_totals())


# --- batches ---------------------------------------------------------------------------------
def test_a_batch_is_counted_whole_with_its_items_results() -> None:
    host = Host()
    c = host.c
    entry = host.session()
    for _ in range(3):
        host.vms.get("vm_" + entry["id"]).answers.append(ok_answer() | {"stdout": "z" * 20_000})
    items = [{"code": "1", "session_id": entry["id"]}] * 3 + [{"code": 7}]
    meta = batch_cases.submit_batch(c, "t1", "default", items, 2)
    c.celery.take(queue.RUN_BATCH.name)
    BatchRunner(c, meta["id"]).run()
    c.celery.join()
    found = batches.load_items(c.redis, meta["id"])
    assert [found[i]["status"] for i in range(4)] == ["succeeded"] * 3 + ["invalid"]

    # The batch is one entry: every field of its three hashes, as stored now.
    size = storage.ENTRY_OVERHEAD
    for key in (keys.batch(meta["id"]), keys.batch_items(meta["id"]), keys.batch_specs(meta["id"])):
        for name, value in c.redis.hgetall(key).items():
            size += len(name) + len(value) + batches.FIELD_OVERHEAD
    assert entries(c)["batch:" + meta["id"]] == size
    assert size > 3 * 20_000  # each item holds its execution's output
    assert held(c) == sum(entries(c).values())


def test_a_batch_over_the_cap_is_refused_and_stores_nothing() -> None:
    c = unit_context()
    tenants.set_limits(c.redis, "t1", max_redis_mib=1)
    items = [{"code": "#" * 300_000}] * 4
    with pytest.raises(TenantStorageFull):
        batch_cases.submit_batch(c, "t1", "default", items, 2)
    assert c.redis.keys(keys.batch("*")) == [] and held(c) == 0
    assert leases.holders(c.redis, keys.tenant_batches("t1")) == 0
    assert c.celery.sent == []


def test_a_batchs_writes_keep_its_records_alive_and_never_bring_back_an_expired_one() -> None:
    c = unit_context()
    meta = batch_cases.submit_batch(c, "t1", "default", [{"code": "1"}], 1)
    batch_keys = [keys.batch(meta["id"]), keys.batch_items(meta["id"])]
    for key in batch_keys:
        c.redis.expire(key, 5)
    batches.save_item(c.redis, meta["id"], {"index": 0, "status": batches.RUNNING}, 900)
    assert all(890 < c.redis.ttl(key) <= 900 for key in batch_keys)
    expiry = c.redis.zscore(keys.tenant_storage("t1"), "batch:" + meta["id"])
    assert time.time() + 890 < expiry <= time.time() + 900

    c.redis.delete(*batch_keys)  # expired
    batches.save_item(c.redis, meta["id"], {"index": 0, "status": "succeeded"}, 900)
    batches.finish(c.redis, meta["id"], 900)
    assert not c.redis.exists(*batch_keys)


def test_items_of_a_tenant_past_its_cap_end_with_the_reason_and_finished_ones_are_kept() -> None:
    host = Host()
    c = host.c
    tenants.set_limits(c.redis, "t1", max_redis_mib=1)
    entry = host.session()
    host.vms.get("vm_" + entry["id"]).answers = [ok_answer() | {"stdout": "w" * (MIB + 1000)}]
    items = [{"code": "1", "session_id": entry["id"]}] * 2
    meta = batch_cases.submit_batch(c, "t1", "default", items, 1)
    c.celery.take(queue.RUN_BATCH.name)
    BatchRunner(c, meta["id"]).run()
    c.celery.join()
    first, second = (batches.load_item(c.redis, meta["id"], i) for i in range(2))
    assert first["status"] == "succeeded"
    assert len(first["execution"]["stdout"]) == MIB + 1000  # stored whole, past the cap
    assert second["status"] == batches.ERROR and "SHOAL_TENANT_MAX_REDIS_MIB" in second["error"]


# --- /healthz --------------------------------------------------------------------------------
def admin_headers(r) -> dict[str, str]:
    return {"Authorization": f"Bearer {admin_keys.create_admin_key(r)[1]}"}


class RedisWithInfo(fakeredis.FakeRedis):
    memory: dict = {}

    def info(self, section=None, *args, **kwargs):
        return dict(self.memory)


@pytest.mark.parametrize(
    ("used", "status", "full"),
    [(100 * MIB, 200, False), (256 * MIB, 503, True)],
)
def test_healthz_reports_memory_and_is_degraded_only_at_maxmemory(used, status, full) -> None:
    app = create_app(unit_settings(redis_maxmemory_mib=256))
    c = app.extensions["shoal"]
    c.redis = RedisWithInfo(decode_responses=True)
    c.redis.memory = {
        "used_memory": used,
        "maxmemory": 256 * MIB,
        "maxmemory_policy": "noeviction",
    }
    publish_heartbeat(c.redis)
    c.redis.set(keys.beat_heartbeat(), f"{time.time():.3f}")
    # Tenants at their whole share: refused by design, not an outage.
    storage.charge(c.redis, "acme", [("exec:x", c.settings.tenants_redis_bytes, 600)])

    response = app.test_client().get("/healthz", headers=admin_headers(c.redis))
    assert response.status_code == status, response.get_json()
    memory = response.get_json()["redis"]["memory"]
    assert memory["used_bytes"] == used and memory["max_bytes"] == 256 * MIB
    assert memory["used_pct"] == round(100 * used / (256 * MIB), 1)
    assert memory["policy"] == "noeviction" and memory["full"] is full
    assert memory["tenants_max_bytes"] == 256 * MIB * 80 // 100
    assert memory["tenants_bytes"] >= memory["tenants_max_bytes"]
    assert memory["notes"] == []
    assert any("maxmemory" in down for down in response.get_json()["down"]) is full


def test_healthz_says_when_redis_is_unbounded_or_evicts() -> None:
    app = create_app(unit_settings(redis_maxmemory_mib=256))
    c = app.extensions["shoal"]
    c.redis = RedisWithInfo(decode_responses=True)
    publish_heartbeat(c.redis)
    c.redis.set(keys.beat_heartbeat(), f"{time.time():.3f}")
    c.redis.memory = {"used_memory": MIB, "maxmemory": 0, "maxmemory_policy": "noeviction"}
    admin = admin_headers(c.redis)
    memory = app.test_client().get("/healthz", headers=admin).get_json()["redis"]["memory"]
    assert memory["full"] is False and "no maxmemory" in memory["notes"][0]
    c.redis.memory = {"used_memory": MIB, "maxmemory": MIB << 10, "maxmemory_policy": "allkeys-lru"}
    notes = app.test_client().get("/healthz", headers=admin).get_json()["redis"]["memory"]["notes"]
    assert "SHOAL_REDIS_MAXMEMORY_MIB" in notes[0] and "allkeys-lru" in notes[1]


# --- settings and the private Redis ----------------------------------------------------------
def test_maxmemory_defaults_to_an_eighth_of_ram_and_the_shares_follow_it() -> None:
    s = load({})
    assert s.redis_maxmemory_bytes == min(physical_memory_bytes() // 8, DEFAULT_REDIS_MAXMEMORY_CAP)
    assert s.tenants_redis_bytes == s.redis_maxmemory_bytes * 80 // 100
    small = load({"SHOAL_REDIS_MAXMEMORY_MIB": "200"})
    assert small.tenants_redis_bytes == 160 * MIB
    assert small.tenant_max_redis_mib == 80  # never above half of the tenants' share
    for bad in ({"SHOAL_REDIS_MAXMEMORY_MIB": "-1"}, {"SHOAL_REDIS_TENANTS_PCT": "100"}):
        with pytest.raises(SystemExit, match=next(iter(bad))):
            load(bad)
    with pytest.raises(SystemExit, match="SHOAL_TENANT_MAX_REDIS_MIB"):
        load({"SHOAL_TENANT_MAX_REDIS_MIB": "0"})


def test_the_private_redis_is_started_bounded_and_never_evicting(tmp_path, monkeypatch) -> None:
    from shoal.ops import stack

    started: list[list[str]] = []
    monkeypatch.setattr(stack.processes, "running_pid", lambda *a: None)
    monkeypatch.setattr(stack.processes, "start", lambda s, name, argv: started.append(argv))
    monkeypatch.setattr(stack, "_wait_for", lambda *a: None)
    settings = load({"SHOAL_HOME": str(tmp_path), "SHOAL_REDIS_MAXMEMORY_MIB": "300"})
    (tmp_path / "run").mkdir()
    stack.start_redis(settings)
    ((program, conf),) = started
    assert program == "redis-server"
    lines = Path(conf).read_text().splitlines()
    assert f"maxmemory {300 * MIB}" in lines
    assert "maxmemory-policy noeviction" in lines
