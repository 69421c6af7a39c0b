"""Cold boot to agent ready, through the VM driver (workers/vm.py) directly, and the bare
host -> guest round trip of `x += 1` over the agent channel (no HTTP, no Celery, no worker).

Runs in a namespace of its own (instance `benchvm`, host `benchvm`): its domain names never
clash with the instance under test, whose reconcile therefore never touches them, and the
shape (448 MiB) has no snapshot template there, so every create is a cold boot.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import time

from shoal.bench.core import Bench, BenchError, Result, Scenario, timed_loop

NAMESPACE = {"instance": "benchvm", "host_name": "benchvm"}
COLD_MEMORY_MIB = 448
AGENT_WARM_UP = 50  # a guest just booted is still translating its first code paths


def cold_boot(b: Bench) -> list[Result]:
    if os.geteuid() != 0:
        raise BenchError("cold boot through the VM driver needs root")
    from workers.running_vm import VMSpec
    from workers.vm import VMManager

    settings = dataclasses.replace(b.settings, **NAMESPACE)
    manager = VMManager(settings)
    spec = VMSpec(
        image=settings.default_image, vcpus=1, memory_mib=COLD_MEMORY_MIB, data_disk_mib=256
    )
    count = b.size(1, 3)
    boots, totals, direct = [], [], []
    manager.destroy_all()  # a run that crashed may have left one
    try:
        for i in range(count):
            vm = manager.create(f"bench-cold-{secrets.token_hex(4)}", spec)
            if vm.restored:
                raise BenchError("the cold-boot shape has a template in the bench namespace")
            boots.append(vm.timings.get("start", 0) + vm.timings.get("agent", 0))
            totals.append(vm.timings["total"])
            b.progress(f"  {i + 1}/{count}: agent ready {boots[-1] / 1000:.1f} s after start")
            if i == 0:
                for _ in range(AGENT_WARM_UP):
                    vm.execute("x = 1")
                direct = timed_loop(b.size(100, 500), 60, lambda _i, vm=vm: _agent_call(vm))
            manager.destroy(vm.vm_id)
    finally:
        manager.destroy_all()
    accel = manager.accel().kind
    return [
        Result(
            "cold_boot",
            f"cold boot to agent ready (domain start + agent hello; {accel}, VM driver)",
            samples=boots,
            extra={"create_total_ms": totals},
        ),
        Result(
            "agent_direct",
            "host -> guest `x += 1` -> host over the agent channel alone (no HTTP/Celery)",
            samples=direct,
            notes="AgentClient.execute from this process on a cold-booted VM",
        ),
    ]


def _agent_call(vm) -> float:
    started = time.perf_counter()
    answer = vm.execute("x += 1")
    if answer.get("status") != "ok":
        raise BenchError(f"agent execute: {answer.get('status')}")
    return (time.perf_counter() - started) * 1000


SCENARIOS = [
    Scenario("cold_boot", "(4) cold boot to agent ready; the bare agent channel", cold_boot),
]
