"""Records expire: after a whole use of Shoal on fakeredis (a tenant's key, sessions made and
deleted by the real host runtime, executions waited for, polled and cancelled, files up and
down, a dynamic-sessions identifier, a batch with files, collection and a webhook, beat's
housekeeping), every key in Redis has a TTL, except the registries that must persist, listed
here with why. Once the sessions have ended, nothing of theirs stays without a TTL either."""

from __future__ import annotations

import base64
import fnmatch
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from pool.expiry import expire_idle
from shoal import executions, keys, liveness, queue, sessions, storage, tenants, webhooks
from shoal.errors import SessionNotFound
from shoal.use_cases import batches as batch_cases
from shoal.use_cases import executions as execution_cases
from shoal.use_cases import files as file_cases
from shoal.use_cases import sessions as session_cases
from tests.unit.fakes import (
    AnsweringCelery,
    FakeAgent,
    FakeVMManager,
    ok_answer,
    publish_heartbeat,
    unit_context,
    unit_settings,
)
from workers.batch_runner import BatchRunner
from workers.host import HostRuntime

P = keys.PREFIX
# Keys that live without a TTL, and why: each is bounded by what the operator or the tenants
# have (keys, tenants, hosts, images, pools), or its members leave it when what they stand
# for ends.
PERSISTENT = {
    f"{P}:apikey:*": "an API key's hash, until it is revoked",
    f"{P}:apikeys": "key ids, until revoked",
    f"{P}:tenants": "the tenants that have keys",
    f"{P}:tenant:*:limits": "a tenant's own limits, set by the operator",
    f"{P}:tenant:*:max_sessions": "a tenant's own session cap, set by the operator",
    f"{P}:tenant:*:webhook_secret": "the tenant's webhook signing secret",
    f"{P}:usage:*": "a tenant's session-seconds, one field per pool",
    f"{P}:hosts": "every host that registered",
    f"{P}:image:*": "an image's Python packages, published by its hosts",
    f"{P}:metrics:*": "the counters and histograms of /metrics (bounded label sets)",
    f"{P}:storage:totals": "bytes counted per tenant (shoal/storage.py); a tenant's field goes "
    "when its last entry expires",
    f"{P}:sessions:deadlines": "live sessions; a session leaves when it ends",
    f"{P}:sessions:lifetimes": "live sessions; a session leaves when it ends",
    f"{P}:batches:running": "unfinished batches; a batch leaves when it finishes",
}
# A live session's registry: no TTL while the session lives (its idle expiry and max lifetime
# end it), a tombstone with a TTL or nothing once it has ended.
LIVE_SESSION = {
    f"{P}:session:ses_*": "a live session's entry; a tombstone with a TTL once it ends",
    f"{P}:session:ses_*:seq": "a live session's execution numbers; deleted when it ends",
    f"{P}:tenant:*:sessions": "a tenant's live sessions",
    f"{P}:pool:*:sessions": "a pool's live sessions",
    f"{P}:host:*:sessions": "a host's live sessions",
}


@dataclass
class FilesAgent(FakeAgent):
    """A guest agent with a /mnt/data in memory: enough for the host's file operations."""

    files: dict[str, bytes] = field(default_factory=dict)

    def list_files(self, path: str, recursive: bool) -> list[dict]:
        return [{"path": p, "type": "file", "size": len(b)} for p, b in sorted(self.files.items())]

    def stat(self, path: str) -> dict:
        return {"path": path, "type": "file", "size": len(self.files[path])}

    def delete(self, path: str) -> None:
        self.files.pop(path, None)

    def put_file(self, path: str, chunks: Iterator[bytes]) -> dict:
        self.files[path] = b"".join(chunks)
        return {"path": path, "size": len(self.files[path])}

    def open_file(self, path: str) -> tuple[dict, Iterator[bytes]]:
        data = self.files[path]
        return self.stat(path), (data[i : i + 1000] for i in range(0, len(data), 1000))


class FilesVMs(FakeVMManager):
    def create(self, vm_id, spec):
        vm = super().create(vm_id, spec)
        vm.agent = FilesAgent()
        return vm


def without_ttl(r) -> set[str]:
    return {key for key in r.keys("*") if r.ttl(key) == -1}


def unexplained(found: set[str], allowed: dict[str, str]) -> set[str]:
    return {key for key in found if not any(fnmatch.fnmatchcase(key, p) for p in allowed)}


@pytest.fixture()
def c(tmp_path, monkeypatch):
    c = unit_context(unit_settings(home=str(tmp_path)), celery=AnsweringCelery())
    publish_heartbeat(c.redis)
    runtime = HostRuntime(c.settings, r=c.redis, rb=c.redis_bin, vms=FilesVMs())
    c.redis.sadd(keys.hosts(), runtime.host)
    for task, method in [
        (queue.CREATE_SESSION, runtime.create_session),
        (queue.EXECUTE, runtime.execute),
        (queue.CANCEL, runtime.cancel),
        (queue.DESTROY_SESSION, runtime.destroy_session),
        (queue.FILE_OP, runtime.file_op),
        (queue.PUT_FILE, runtime.put_file),
        (queue.GET_FILE, runtime.get_file),
    ]:
        c.celery.answer(task.name, lambda t, method=method: method(**t.kwargs))
    monkeypatch.setattr(webhooks, "post_once", lambda *a: (200, None, False))
    c.celery.answer(
        queue.DELIVER_WEBHOOK.name,
        lambda t: webhooks.deliver(c.settings, c.redis, c.celery, t.kwargs["owner_id"]),
    )
    c.runtime = runtime
    yield c
    runtime.stop()


PARAMS = {"code": "1 + 1", "language": "python", "timeout_s": 5, "max_output": 1000}


def use_everything(c) -> None:
    """What clients, hosts and beat do, through the same code paths as in production."""
    api_key = tenants.create_key(c.redis, "t1")[1]
    tenants.set_limits(c.redis, "t1", max_pending=100, max_redis_mib=64)
    tenants.set_max_sessions(c.redis, "t1", 10)
    assert tenants.authenticate_request(c.redis, api_key, c.settings)[0] == "t1"
    webhooks.tenant_secret(c.settings, c.redis, "t1")

    entry = session_cases.create_session(c, "t1", "default")
    assert entry["state"] == sessions.ACTIVE
    done = execution_cases.run_execution(c, entry, PARAMS, idempotency_key="k1", wait=True)
    assert done["status"] == "succeeded"
    again = execution_cases.run_execution(c, entry, PARAMS, idempotency_key="k1", wait=True)
    assert again["id"] == done["id"]
    polled = execution_cases.submit_execution(c, entry, PARAMS)
    assert execution_cases.wait_execution(c, polled)["status"] == "succeeded"

    release = threading.Event()
    vm = c.runtime.vms.get(c.runtime.session_vm[entry["id"]])
    vm.answers.append(lambda: release.wait(5) and ok_answer())
    slow = execution_cases.submit_execution(c, entry, PARAMS)
    execution_cases.cancel_execution(c, slow)
    release.set()
    execution_cases.wait_execution(c, slow)

    file_cases.upload_file(c, entry, "in.txt", iter([b"a" * 3000, b"b" * 3000]))
    _, chunks = file_cases.download_file(c, entry, "in.txt")
    assert b"".join(chunks) == b"a" * 3000 + b"b" * 3000
    assert file_cases.file_op(c, entry, "list", path="", recursive=True)["files"]

    named = session_cases.session_for_identifier(c, "t1", "default", "notebook")
    execution_cases.run_execution(c, named, PARAMS, wait=True)

    item = {
        "code": "1",
        "files": {"data.txt": base64.b64encode(b"xyz").decode()},
        "collect": ["*.txt"],
    }
    batch = batch_cases.submit_batch(
        c, "t1", "default", [item, item, {"code": 7}], 2, "https://example.com/hook"
    )
    c.celery.take(queue.RUN_BATCH.name)
    BatchRunner(c, batch["id"]).run()
    c.celery.join()

    liveness.check_hosts(c.redis, c.settings.execution_ttl_s)
    expire_idle(c)
    storage.sweep(c.redis)


def test_every_key_has_a_ttl_but_the_registries_that_must_persist(c) -> None:
    use_everything(c)
    live = [e for e in sessions.list_for_tenant(c.redis, "t1")]
    assert len(live) == 2  # the plain session and the identifier's: the batch's were deleted

    found = without_ttl(c.redis)
    assert unexplained(found, PERSISTENT | LIVE_SESSION) == set(), sorted(found)
    # What was counted for the tenant is all there, with an expiry.
    assert storage.held(c.redis, "t1") > 0
    assert c.redis.ttl(keys.tenant_storage("t1")) > c.settings.execution_ttl_s

    for entry in live:
        session_cases.delete_session(c, entry)
    c.celery.join()
    found = without_ttl(c.redis)
    assert unexplained(found, PERSISTENT) == set(), sorted(found)
    # The live-session registries are empty (so gone), and every tombstone has a TTL.
    assert not any(fnmatch.fnmatchcase(k, p) for k in found for p in LIVE_SESSION)
    assert not c.redis.keys(keys.identifier("t1", "default", "*"))


def test_the_keys_of_unfinished_work_have_ttls_too(c) -> None:
    """Mid-flight: an execution queued and not yet run, a request waiting for it, a batch
    waiting for its turn; the sets that count them outlive their newest member, not for ever."""
    del c.celery.answers[queue.EXECUTE.name]  # the host never gets to them
    entry = session_cases.create_session(c, "t1", "default")
    execution_cases.submit_execution(c, entry, PARAMS, idempotency_key="k2")
    waiting = threading.Thread(
        target=execution_cases.run_execution, args=(c, entry, PARAMS, "", True), daemon=True
    )
    waiting.start()
    for _ in range(100):
        if c.redis.zcard(keys.tenant_waits("t1")):
            break
        threading.Event().wait(0.01)
    for pattern in (
        keys.session_executions("*"),
        keys.tenant_executions("*"),
        keys.tenant_waits("*"),
    ):
        (key,) = c.redis.keys(pattern)
        assert c.redis.zcard(key) and c.redis.ttl(key) > 0, key
    found = without_ttl(c.redis)
    assert unexplained(found, PERSISTENT | LIVE_SESSION) == set(), sorted(found)
    for execution_id in c.redis.zrange(keys.session_executions(entry["id"]), 0, -1):
        record = executions.load(c.redis, execution_id)
        executions.finish(c.redis, record, c.settings.execution_ttl_s)
    waiting.join(5)
    assert not waiting.is_alive()


def test_an_execution_for_a_session_that_ended_is_refused_and_leaves_nothing(c) -> None:
    entry = session_cases.create_session(c, "t1", "default")
    session_cases.delete_session(c, entry)
    c.celery.join()
    with pytest.raises(SessionNotFound, match="has ended"):
        execution_cases.submit_execution(c, entry, PARAMS)
    assert not c.redis.exists(keys.session_seq(entry["id"]))
    assert c.redis.ttl(keys.session(entry["id"])) > 0  # still the tombstone, with its TTL
    c.redis.delete(keys.session(entry["id"]))  # and once the tombstone has gone too
    with pytest.raises(SessionNotFound):
        execution_cases.submit_execution(c, entry, PARAMS)
    assert not c.redis.exists(keys.session(entry["id"]), keys.session_seq(entry["id"]))
