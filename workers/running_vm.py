"""One running VM of this host as its owner holds it (`VM`), and what a pool asks of its VMs
(`VMSpec`). Made by workers/vm.py `VMManager`; see its docstring for executions and loss."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from shoal import protocol
from shoal.pools import Pool
from shoal.settings import Settings
from workers import domain as dom
from workers import transfer_disk
from workers.agent_client import (
    AgentClient,
    AgentDisconnected,
    AgentError,
    AgentProtocolError,
    AgentTimeout,
)
from workers.vm_errors import AgentRefused, VMLost

log = logging.getLogger("shoal.vm")


@dataclass(frozen=True)
class VMSpec:
    """What a pool asks of its VMs."""

    image: str = "python"
    vcpus: int = 1
    memory_mib: int = 512
    data_disk_mib: int = 1024
    network: bool = False
    cpu_quota: float = 0.0  # cores for the whole QEMU process (cgroup cpu); 0: no cap

    def shape(self) -> dict[str, Any]:
        shape = asdict(self)
        del shape["image"]
        return shape


def spec_for(pool: Pool) -> VMSpec:
    """What the pool's VMs are."""
    return VMSpec(
        image=pool.image,
        vcpus=pool.vcpus,
        memory_mib=pool.memory_mib,
        data_disk_mib=pool.data_disk_mib,
        network=pool.network,
    )


class VM:
    """One running VM owned by this process."""

    def __init__(
        self,
        settings: Settings,
        vm_id: str,
        key: str,
        domain_name: str,
        uuid: str,
        paths: dom.VMPaths,
        spec: VMSpec,
        restored: bool,
        agent: AgentClient,
        timings: dict[str, float] | None = None,
    ) -> None:
        self.settings = settings
        self.vm_id = vm_id
        self.key = key
        self.domain_name = domain_name
        self.uuid = uuid
        self.paths = paths
        self.spec = spec
        self.restored = restored
        self.agent = agent
        self.timings = timings or {}
        self.created_at = time.time()
        self.lost_reason: str | None = None

    def execute(
        self,
        code: str,
        language: str = "python",
        timeout_s: float = 60,
        max_output: int = protocol.DEFAULT_MAX_OUTPUT,
    ) -> dict[str, Any]:
        """Run code in the guest; the agent's answer (status ok/error/timed_out/interrupted).

        Raises VMLost when the guest does not answer in time, breaks the protocol or closes the
        channel: the VM is then marked lost, and the caller must destroy it. AgentRefused when
        the agent refuses the request (the VM is intact).
        """
        if self.lost_reason is not None:
            raise VMLost(f"VM {self.vm_id}: {self.lost_reason}")
        grace = self.agent.interrupt_grace_s + self.settings.interrupt_grace_s
        budget = min(max(self.settings.max_rich_output_bytes, 0), protocol.MAX_RICH_OUTPUT_BYTES)
        try:
            return self.agent.execute(
                code, language, timeout_s, max_output, grace_s=grace, max_rich_output_bytes=budget
            )
        except AgentError as exc:
            raise AgentRefused(exc.code, exc.message) from None
        except AgentTimeout:
            reason = (
                f"the execution did not end within its {timeout_s} s timeout plus {grace:.0f} s "
                "(the agent interrupts at the timeout, then restarts the interpreter)"
            )
        except AgentProtocolError as exc:
            reason = f"the guest broke the agent protocol ({exc})"
        except AgentDisconnected as exc:
            reason = self.lost_reason or f"the agent channel closed ({exc})"
        self._mark_lost(reason)
        raise VMLost(f"VM {self.vm_id}: {reason}")

    def put_file(self, path: str, chunks: Iterable[bytes]) -> dict[str, Any]:
        """Upload `chunks` into the guest file `path`; its stat entry. The bytes go through
        the VM's transfer disk when the guest has one (workers/transfer_disk.py), else over
        the agent's channel. Agent errors raise as the agent client raises them."""
        if not (self.agent.has_transfer_disk and self.paths.transfer_disk.exists()):
            return self.agent.put_file(path, chunks)
        with transfer_disk.Writer(self.paths.transfer_disk) as writer:
            return self.agent.put_file_via_disk(path, writer.segments(chunks))

    def _mark_lost(self, reason: str) -> None:
        """The guest is not trusted again: refuse every later call, close its channel."""
        if self.lost_reason is None:
            self.lost_reason = reason
            log.error("vm=%s host=%s VM lost: %s", self.vm_id, self.settings.host_name, reason)
        self.agent.close()

    def qemu_pid(self) -> int | None:
        """The pid of the domain's QEMU process (libvirt's pid file), or None."""
        try:
            return int(Path(f"/run/libvirt/qemu/{self.domain_name}.pid").read_text().strip())
        except (OSError, ValueError):
            return None
