"""(15) Sleeping sessions: a session holding ~200 MB of Python objects put to sleep and woken.

Each round asks `POST /v1/sessions/{id}/sleep` and times it until the session reads `sleeping`
(the image complete on disk), then times the next execution, which wakes it, to its answer. The
image is in the host's page cache then (it was just written); one more round drops the host's
caches first (as root: the cold figure). The image's size is read off the instance's disk when
the benchmark runs beside it.
"""

from __future__ import annotations

import time
from pathlib import Path

from shoal.bench.core import Bench, BenchError, Goal, Result, Scenario
from shoal.bench.target import SLEEP_POOL

POLL_S = 0.01
SLEEP_WAIT_S = 120.0
# ~200 MB of objects: 25 million floats in a numpy array.
LOAD = "import numpy as np\ndata = np.random.rand(25_000_000)\nkept = float(data.sum())"
CHECK = "float(data.sum()) == kept"
DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def _asleep(b: Bench, session_id: str) -> float:
    """Ask the session to sleep; seconds until it reads `sleeping`."""
    started = time.perf_counter()
    response = b.request("POST", f"/v1/sessions/{session_id}/sleep")
    if response.status_code != 202:
        raise BenchError(f"sleep: {response.status_code} {response.text[:300]}")
    while time.perf_counter() - started < SLEEP_WAIT_S:
        state = b.request("GET", f"/v1/sessions/{session_id}").json().get("state")
        if state == "sleeping":
            return time.perf_counter() - started
        time.sleep(POLL_S)
    raise BenchError(f"the session did not sleep within {SLEEP_WAIT_S:.0f} s")


def _woken(b: Bench, session_id: str) -> float:
    """Run CHECK, which wakes the session; seconds to its answer."""
    ms, record, _sent, _received = b.execute(session_id, CHECK)
    if record.get("status") != "succeeded" or record.get("result", {}).get("text/plain") != "True":
        raise BenchError(f"the woken session lost its state: {str(record)[:300]}")
    return ms / 1000


def _image_mb(b: Bench) -> float | None:
    images = list((b.settings.instance_vm_dir / "sleeping").glob("*.save"))
    return images[0].stat().st_size / 1e6 if len(images) == 1 else None


def _drop_caches() -> bool:
    try:
        DROP_CACHES.write_text("3\n")
    except OSError:
        return False
    return True


def sleep_wake(b: Bench) -> list[Result]:
    rounds = b.size(2, 5)
    session_id = b.new_session(pool=SLEEP_POOL)
    sleeps, wakes, sizes, cold = [], [], [], None
    try:
        _ms, loaded, _s, _r = b.execute(session_id, LOAD)
        if loaded.get("status") != "succeeded":
            raise BenchError(f"loading the data failed: {str(loaded)[:300]}")
        for _ in range(rounds):
            sleeps.append(_asleep(b, session_id) * 1000)
            size = _image_mb(b)
            if size is not None:
                sizes.append(size)
            wakes.append(_woken(b, session_id) * 1000)
        sleeps.append(_asleep(b, session_id) * 1000)
        if _drop_caches():
            cold = _woken(b, session_id) * 1000
    finally:
        b.delete_session(session_id)
    b.progress(f"  sleep {sleeps} ms, wake {wakes} ms, cold wake {cold} ms, image {sizes} MB")
    results = [
        Result("sleep_time", "POST .../sleep until the session reads sleeping (~200 MB held)",
               samples=sleeps),
        Result("wake_to_answer", "the next execution after a sleep, to its answer (image in "
               "the host's page cache)", samples=wakes,
               goals=(Goal("p50 <= 1 s", "p50", 1000.0, issue=15),
                      Goal("p50 <= 500 ms (stretch)", "p50", 500.0, issue=15))),
    ]  # fmt: skip
    if cold is not None:
        results.append(Result("wake_to_answer_cold", "the same, after dropping the host's "
                              "caches", value=cold))  # fmt: skip
    if sizes:
        results.append(Result("sleep_image", "bytes on disk per sleeping session", unit="MB",
                              value=sum(sizes) / len(sizes)))  # fmt: skip
    return results


SCENARIOS = [Scenario("sleep_wake", "(15) a session put to sleep and woken", sleep_wake)]
