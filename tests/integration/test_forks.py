"""Forks on real VMs (docs/api.md, "Forks"), on the shared stack: forks of a session start with its
variables, files and working directory, never see each other's writes nor the parent theirs, and
draw their own random numbers even where the parent seeded its generator; the parent runs on.
Another tenant cannot fork a session; bad counts are refused. A batch `from_session` runs each
item in a fork of its own, and ends the forks with the items; nothing is left on disk.
"""

from __future__ import annotations

import requests

from shoal.settings import load
from tests.integration.conftest import Stack
from tests.integration.test_batches import finished, post_batch

SETUP = """
import os, random
x = 41
os.chdir('/mnt/data')
open('kept.txt', 'w').write('kept')
random.seed(7)
"""
STATE = "print(x, open('kept.txt').read(), os.getcwd())"


def fork(stack: Stack, session_id: str, key: str | None = None, **body) -> requests.Response:
    return requests.post(
        f"{stack.url}/v1/sessions/{session_id}/fork",
        json=body,
        headers=stack.headers(key),
        timeout=300,
    )


def out(stack: Stack, session_id: str, code: str) -> str:
    answer = stack.execute(session_id, code)
    assert answer["status"] == "succeeded", answer
    return answer["stdout"].strip()


def delete(stack: Stack, session_id: str) -> None:
    requests.delete(f"{stack.url}/v1/sessions/{session_id}", headers=stack.headers(), timeout=60)


def fork_bases(stack: Stack) -> list:
    return [p for p in load(stack.env).instance_vm_dir.glob("forking-*/*")]


def test_forks_start_as_the_parent_was_and_go_their_own_ways(stack: Stack) -> None:
    parent = stack.new_session()
    out(stack, parent, SETUP)
    answer = fork(stack, parent, count=2)
    assert answer.status_code == 201, answer.text
    forks = answer.json()["sessions"]
    assert len(forks) == 2
    assert all(f["forked_from"] == parent and f["state"] == "active" for f in forks)
    ids = [f["id"] for f in forks]
    try:
        for session_id in (parent, *ids):
            assert out(stack, session_id, STATE) == "41 kept /mnt/data"
        # The parent seeded its generator: each fork draws its own numbers all the same.
        draws = {out(stack, s, "print(random.random(), os.urandom(8).hex())") for s in ids}
        assert len(draws) == 2
        out(stack, ids[0], "x = 'a'\nopen('only-a', 'w').write('a')")
        out(stack, ids[1], "x = 'b'")
        seen = "print(x, os.path.exists('only-a'))"
        assert out(stack, parent, seen) == "41 False"
        assert out(stack, ids[1], seen) == "b False"
        assert out(stack, ids[0], seen) == "a True"
        listed = requests.get(f"{stack.url}/v1/sessions", headers=stack.headers(), timeout=30)
        assert set(ids) <= {s["id"] for s in listed.json()["sessions"]}
        # Another tenant's request answers as for a session that never existed.
        other = fork(stack, parent, stack.new_key("fork-stranger"), count=1)
        assert other.status_code == 404, other.text
        for bad in ({"count": 0}, {"count": 17}, {"count": "two"}, {"counts": 1}):
            refused = fork(stack, parent, **bad)
            assert refused.status_code == 400, (bad, refused.text)
    finally:
        for session_id in ids:
            delete(stack, session_id)
        delete(stack, parent)
    assert fork_bases(stack) == []  # the parent's base went with it


def test_a_batch_from_a_session_runs_each_item_in_a_fork_of_its_own(stack: Stack) -> None:
    key = stack.new_key("fork-batcher")
    parent = stack.new_session(key)
    prepared = stack.execute(parent, "data = list(range(1000))\nn = 0", key)
    assert prepared["status"] == "succeeded", prepared
    item = (
        "import os\nn += 1\nopen('/mnt/data/item-{}', 'w').write('x')\n"
        "print(len(data), n, sorted(os.listdir('/mnt/data')))"
    )
    items = [{"code": item.format(i)} for i in range(4)]
    created = post_batch(stack, key, from_session=parent, items=items, max_parallel=2)
    assert created["from_session"] == parent
    batch = finished(stack, key, created["id"], 300)
    assert batch["counts"] == {"succeeded": 4}, batch
    for i, result in enumerate(batch["items"]):
        stdout = result["execution"]["stdout"].strip()
        assert stdout == f"1000 1 ['item-{i}']", stdout  # its own fork: nothing of the others
    parent_n = stack.execute(parent, "print(n)", key)["stdout"].strip()
    assert parent_n == "0"  # the items never ran in the parent
    live = requests.get(f"{stack.url}/v1/sessions", headers=stack.headers(key), timeout=30)
    assert [s["id"] for s in live.json()["sessions"]] == [parent]  # the forks ended
    requests.delete(f"{stack.url}/v1/sessions/{parent}", headers=stack.headers(key), timeout=60)
