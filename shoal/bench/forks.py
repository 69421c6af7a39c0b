"""(15) Forks: a session holding ~200 MB of Python objects forked N ways, and a batch run in forks
of a prepared session against the same batch whose items each load the data themselves.

`fork`: for N = 1, 4, 16 (quick: 1, 4), the time from `POST /v1/sessions/{id}/fork` until every
fork has answered a first execution that names the parent's data (`len(data)`, sent to all
forks at once as soon as the POST answers); then, untimed, each fork sums the whole array and
must find the parent's figure. The forks are deleted between rounds.

`fork_batch`: a session loads ~100 MB of data (a DataFrame built in the guest, the same code
every baseline item runs); then a batch of 200 items (quick: 20) `from_session` it, each item
computing one figure off the data, against the same items in a plain batch where each item
builds the data first. Both with the same max_parallel, in the `default` pool (its ready VMs
serve the plain batch as they serve any), polled until done.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from shoal.bench.batches import run_batch
from shoal.bench.core import Bench, BenchError, Goal, Result, Scenario

# ~200 MB of objects: 25 million floats in a numpy array (as the sleep_wake scenario).
LOAD = "import numpy as np\ndata = np.random.rand(25_000_000)\nkept = float(data.sum())"
ANSWER = "len(data)"  # a fork's first answer (timed): its copy of the parent's variables is there
CHECK = "float(data.sum()) == kept"  # after the timing: every byte of them is the parent's
# ~100 MB of data built in the guest: 1.5 million rows, three numeric columns and a string key.
BUILD = (
    "import numpy as np, pandas as pd\n"
    "rng = np.random.default_rng(0)\n"
    "df = pd.DataFrame({'a': rng.random(1_500_000), 'b': rng.integers(0, 1000, 1_500_000),\n"
    "                   'c': rng.random(1_500_000)})\n"
    "df['key'] = df.b.astype(str)\n"
)
ITEM = "round(float(df.a[df.b == {}].sum()), 6)"
BATCH_PARALLEL = 8
BATCH_TIMEOUT_S = 3600


def _fork_round(b: Bench, parent: str, count: int) -> tuple[float, list[str]]:
    """Seconds from the POST until every fork answered (ANSWER, sent to all at once); the
    forks' ids, each checked (CHECK) after the timing."""
    started = time.perf_counter()
    response = b.request("POST", f"/v1/sessions/{parent}/fork", json={"count": count}, timeout=600)
    if response.status_code != 201:
        raise BenchError(f"fork of {count}: {response.status_code} {response.text[:300]}")
    forks = [s["id"] for s in response.json()["sessions"]]
    with ThreadPoolExecutor(len(forks)) as pool:
        answers = list(pool.map(lambda f: b.execute(f, ANSWER)[1], forks))
        elapsed = time.perf_counter() - started
        checks = list(pool.map(lambda f: b.execute(f, CHECK)[1], forks))
    for answer, check in zip(answers, checks, strict=True):
        if answer.get("result", {}).get("text/plain") != "25000000":
            raise BenchError(f"a fork did not answer: {str(answer)[:300]}")
        if check.get("result", {}).get("text/plain") != "True":
            raise BenchError(f"a fork lost the parent's data: {str(check)[:300]}")
    return elapsed, forks


def fork(b: Bench) -> list[Result]:
    counts = (1, 4) if b.quick else (1, 4, 16)
    parent = b.new_session()
    results = []
    try:
        _ms, loaded, _s, _r = b.execute(parent, LOAD)
        if loaded.get("status") != "succeeded":
            raise BenchError(f"loading the data failed: {str(loaded)[:300]}")
        for count in counts:
            seconds, forks = _fork_round(b, parent, count)
            for fork_id in forks:
                b.delete_session(fork_id)
            b.progress(f"  fork of {count}: {seconds * 1000:.0f} ms")
            goals: tuple[Goal, ...] = ()
            if count == 1:
                goals = (Goal("<= 2.5 s", "value", 2500.0, issue=15),)
            results.append(Result(f"fork_{count}", f"fork of {count} to all {count} answering "
                                  "(~200 MB held)", value=seconds * 1000, goals=goals))  # fmt: skip
            if count == 16:
                per_fork = Goal("<= 500 ms", "value", 500.0, issue=15)
                results.append(Result("fork_16_per_fork", "the same, per fork",
                                      value=seconds * 1000 / count, goals=(per_fork,)))  # fmt: skip
    finally:
        b.delete_session(parent)
    return results


def _run_batch(b: Bench, body: dict, count: int) -> float:
    seconds, view = run_batch(b, body, BATCH_TIMEOUT_S)
    counts = view.get("counts", {})
    if view.get("status") != "completed" or counts.get("succeeded", 0) != count:
        raise BenchError(f"batch {view.get('id')} ended {view.get('status')} with {counts}")
    return seconds


def fork_batch(b: Bench) -> list[Result]:
    count = b.size(20, 200)
    parent = b.new_session()
    try:
        build_ms, built, _s, _r = b.execute(parent, BUILD + "len(df)")
        if built.get("status") != "succeeded":
            raise BenchError(f"building the data failed: {str(built)[:300]}")
        b.progress(f"  the data built in {build_ms:.0f} ms; {count} items in forks")
        items = [{"code": ITEM.format(i)} for i in range(count)]
        body = {"from_session": parent, "items": items, "max_parallel": BATCH_PARALLEL}
        forked_s = _run_batch(b, body, count)
    finally:
        b.delete_session(parent)
    b.progress(f"  {count / forked_s:.2f} items/s; now each item building the data")
    items = [{"code": BUILD + ITEM.format(i)} for i in range(count)]
    body = {"items": items, "max_parallel": BATCH_PARALLEL}
    plain_s = _run_batch(b, body, count)
    return [
        Result(f"fork_batch_{count}", f"batch of {count} items in forks of a session holding "
               "the data (~100 MB)", unit="items/s", value=count / forked_s,
               extra={"n": count, "wall_s": round(forked_s, 2), "build_ms": round(build_ms)}),
        Result(f"load_batch_{count}", f"the same {count} items, each building the data itself",
               unit="items/s", value=count / plain_s,
               extra={"n": count, "wall_s": round(plain_s, 2)}),
        Result("fork_batch_speedup", "items/s in forks over items/s loading the data",
               unit="x", value=plain_s / forked_s,
               goals=(Goal(">= 5x", "value", 5.0, at_least=True, issue=15),)),
    ]  # fmt: skip


SCENARIOS = [
    Scenario("fork", "(15) a session forked 1, 4 and 16 ways", fork),
    Scenario("fork_batch", "(15) a batch in forks of a prepared session vs loading", fork_batch),
]
