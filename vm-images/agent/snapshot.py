"""Around a VM snapshot: prepare_snapshot before a template is saved, reseed after a restore.

Every clone restored from one template starts with the same memory: the same page cache (dropped
before the snapshot, so no clone carries it), and the same clock, random pool, interpreter random
state and identity. reseed gives each clone its own: the host's time, fresh entropy credited to
the guest kernel's pool, new seeds for the kernel's generators, and the VM id the host named.
Snapshots is the part of supervisor.Agent that answers these two requests. Standard library only.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import os
import re
import struct
import time
from typing import TYPE_CHECKING

from channel import BadRequest

from shoal import protocol

if TYPE_CHECKING:
    from executions import Execution
    from file_requests import GetTransfer, PutTransfer
    from kernel_process import Kernel

RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207
IDENTITY_FILE = "/run/shoal/identity"  # the VM id the host gave at restore (root-owned)
IDENTITY = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


class Snapshots:
    """Part of supervisor.Agent: the prepare_snapshot and reseed requests. The state is the
    Agent's."""

    system: bool
    identity_file: str
    kernel: Kernel | None
    execution: Execution | None
    transfer: GetTransfer | PutTransfer | None

    def op_prepare_snapshot(self, rid: int, message: dict) -> None:
        """Before the host saves this VM as a template: write dirty pages out and drop the page
        cache, which every restored clone would otherwise carry (measured: ~5% of a clone's
        resident memory)."""
        if self.execution is not None or self.transfer is not None:
            self.error(rid, protocol.E_BUSY, "an execution or transfer is running")
            return
        os.sync()
        dropped = False
        if self.system:
            try:
                with open("/proc/sys/vm/drop_caches", "w") as f:
                    f.write("3")
                dropped = True
            except OSError:
                pass
        self.answer(rid, dropped=dropped)

    def op_reseed(self, rid: int, message: dict) -> None:
        time_ns = message.get("time_ns")
        if time_ns is not None and (not isinstance(time_ns, int) or isinstance(time_ns, bool)):
            raise BadRequest("time_ns must be an integer")
        try:
            entropy = base64.b64decode(message.get("entropy", ""), validate=True)
        except (TypeError, ValueError):
            raise BadRequest("entropy must be base64") from None
        if not 16 <= len(entropy) <= 4096:
            raise BadRequest("entropy must be 16 to 4096 bytes")
        notes: dict[str, str] = {}
        if time_ns is None:
            notes["clock"] = "unchanged: no time_ns"
        elif not self.system:
            notes["clock"] = "skipped: system changes disabled (--no-system)"
        else:
            try:
                time.clock_settime_ns(time.CLOCK_REALTIME, time_ns)
                notes["clock"] = "set"
            except OSError as exc:
                notes["clock"] = f"skipped: {exc.strerror or exc}"
        notes["entropy"] = self._mix_entropy(entropy)
        identity = message.get("identity")
        if identity is not None:
            if not isinstance(identity, str) or not IDENTITY.match(identity):
                raise BadRequest("identity must be 1-128 characters: letters, digits, _ . -")
            notes["identity"] = self._record_identity(identity)
        seed = hashlib.sha512(entropy + os.urandom(32) + str(time_ns).encode()).digest()
        k = self.kernel
        if k is not None:
            k.send({"op": "reseed", "seed": base64.b64encode(seed).decode()})
            notes["kernel"] = "reseeded" if k.ready else "reseeded (queued: kernel starting)"
        else:
            notes["kernel"] = "none running (a new one seeds itself from the reseeded pool)"
        self.answer(rid, **notes)

    def _record_identity(self, identity: str) -> str:
        try:
            os.makedirs(os.path.dirname(self.identity_file), exist_ok=True)
            tmp = self.identity_file + ".tmp"
            with open(tmp, "w") as f:
                f.write(identity)
            os.chmod(tmp, 0o444)
            os.replace(tmp, self.identity_file)
            return "recorded"
        except OSError as exc:
            return f"not recorded: {exc.strerror or exc}"

    def _mix_entropy(self, entropy: bytes) -> str:
        if self.system:
            try:
                with open("/dev/urandom", "wb", buffering=0) as f:
                    info = struct.pack("ii", len(entropy) * 8, len(entropy)) + entropy
                    fcntl.ioctl(f.fileno(), RNDADDENTROPY, info)
                    fcntl.ioctl(f.fileno(), RNDRESEEDCRNG)
                return "credited and crng reseeded"
            except OSError:
                pass
        try:
            with open("/dev/urandom", "wb", buffering=0) as f:
                f.write(entropy)
            return "mixed into the pool (not credited)"
        except OSError as exc:
            return f"skipped: {exc.strerror or exc}"
