"""The session's user processes in one cgroup (v2) with a memory and a pids limit.

In the guest the agent (PID 1, root) stays in the root cgroup; everything user code runs is
started straight into a leaf below USER_GROUP, whose limits bound all of it together:

    /sys/fs/cgroup/shoal-user          memory.max, pids.max, cpu.weight (the session's limits)
    /sys/fs/cgroup/shoal-user/kernel   the interpreter and every process it starts
    /sys/fs/cgroup/shoal-user/shell    a shell command and every process it starts

Both leaves have memory.oom.group set: when the session goes over its memory limit, the kernel's
OOM killer picks the largest process in the session and kills its whole leaf. The agent, outside
the group, survives it. A leaf is also killed as a whole (cgroup.kill, race-free against forks)
when the interpreter ends (kernel) or a shell command exits or is killed (shell): background
processes end with what started them (docs/limits.md, "Inside the guest").

guest-init mounts cgroup2 at /sys/fs/cgroup; `setup()` does the rest, once, at agent start (so
every clone of a template has it). Outside the guest (unit tests run the agent on the host, PID
not 1) nothing here touches the host's cgroups. Standard library only.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

CGROUP_ROOT = "/sys/fs/cgroup"
USER_GROUP = "shoal-user"
KERNEL_LEAF = "kernel"
SHELL_LEAF = "shell"
LEAVES = (KERNEL_LEAF, SHELL_LEAF)

MIB = 1 << 20
# Kept out of the session's memory limit: the agent (it may hold a few copies of a 16 MiB
# output while encoding it), the guest kernel's own memory and page cache for the agent's reads.
RESERVE_MIN = 128 * MIB
RESERVE_SHARE = 4  # ... or a quarter of the guest's memory, whichever is more
USER_PIDS = 256  # processes and threads of the session, all of them together

log = logging.getLogger("shoal.agent")


@dataclass(frozen=True)
class Limits:
    memory_bytes: int
    pids: int


def default_limits(mem_total: int, cmdline: str = "") -> Limits:
    """The session's limits in a guest of mem_total bytes (/proc/meminfo MemTotal).

    The kernel command line may override them: shoal.user_memory_mib=N, shoal.user_pids=N.
    """
    reserve = max(RESERVE_MIN, mem_total // RESERVE_SHARE)
    memory = max(32 * MIB, mem_total - reserve)
    pids = USER_PIDS
    for arg in cmdline.split():
        key, _, value = arg.partition("=")
        if not value.isdigit() or int(value) <= 0:
            continue
        if key == "shoal.user_memory_mib":
            memory = min(int(value) * MIB, mem_total)
        elif key == "shoal.user_pids":
            pids = int(value)
    return Limits(memory, pids)


def mem_total(meminfo: str = "/proc/meminfo") -> int:
    with open(meminfo) as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no MemTotal in {meminfo}")


def _write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def report(cgroup: UserCgroup | None) -> dict[str, bool]:
    """What confines user code in this guest, read back from the live system (not from what
    setup meant to do). The host refuses a guest where any is false (docs/security.md)."""

    def reads(path: str, ok: Callable[[str], bool]) -> bool:
        try:
            return ok(_read(path).strip())
        except (OSError, ValueError):
            return False

    return {
        "user_cgroup": cgroup is not None,
        "no_user_namespaces": reads("/proc/sys/user/max_user_namespaces", lambda v: v == "0"),
        "ptrace_restricted": reads("/proc/sys/kernel/yama/ptrace_scope", lambda v: int(v) >= 1),
        "proc_hidden": reads(
            "/proc/mounts",
            lambda v: any(
                line.split()[1] == "/proc"
                and ({"hidepid=invisible", "hidepid=2"} & set(line.split()[3].split(",")))
                for line in v.splitlines()
                if len(line.split()) > 3
            ),
        ),
    }


class UserCgroup:
    """The session's cgroup: start processes in a leaf, kill a leaf, count a leaf's OOM kills."""

    def __init__(self, root: str, limits: Limits):
        self.root = root
        self.limits = limits
        self.group = os.path.join(root, USER_GROUP)

    def leaf(self, name: str) -> str:
        return os.path.join(self.group, name)

    def create(self) -> None:
        """Make the group and its leaves and set the limits (idempotent)."""
        control = os.path.join(self.root, "cgroup.subtree_control")
        _write(control, "+memory +pids")
        try:
            # The group's processes together weigh as much as one agent process on the CPU, so
            # a fork bomb cannot starve the agent (a nicety: no limit depends on it).
            _write(control, "+cpu")
        except OSError as exc:
            log.warning("no cpu controller for the user cgroup: %s", exc)
        os.makedirs(self.group, exist_ok=True)
        _write(os.path.join(self.group, "memory.max"), str(self.limits.memory_bytes))
        _write(os.path.join(self.group, "pids.max"), str(self.limits.pids))
        # The leaves need the memory controller for memory.oom.group; the limits stay above.
        _write(os.path.join(self.group, "cgroup.subtree_control"), "+memory")
        for name in LEAVES:
            os.makedirs(self.leaf(name), exist_ok=True)
            _write(os.path.join(self.leaf(name), "memory.oom.group"), "1")

    def enter(self, name: str, uid: int | None, gid: int | None) -> Callable[[], None]:
        """A preexec_fn: move the new process into leaf `name`, then drop to uid/gid.

        In that order: only root may move a process out of the root cgroup, and the process is
        in its leaf before it runs anything of the user's (so nothing it forks can escape)."""
        procs = os.path.join(self.leaf(name), "cgroup.procs")

        def preexec() -> None:
            _write(procs, "0")
            if gid is not None:
                os.setgroups([])
                os.setgid(gid)
            if uid is not None:
                os.setuid(uid)

        return preexec

    def kill(self, name: str) -> None:
        """SIGKILL every process in leaf `name`, including any forked meanwhile."""
        try:
            _write(os.path.join(self.leaf(name), "cgroup.kill"), "1")
        except OSError as exc:
            log.error("cannot kill the processes of cgroup %s: %s", name, exc)

    def oom_kills(self, name: str) -> int:
        """How many times the OOM killer has killed in leaf `name` (memory.events)."""
        try:
            events = _read(os.path.join(self.leaf(name), "memory.events"))
        except OSError:
            return 0
        counts = dict(line.split() for line in events.splitlines() if line.count(" ") == 1)
        return int(counts.get("oom_kill", "0")) + int(counts.get("oom_group_kill", "0"))


def is_cgroup2(root: str = CGROUP_ROOT) -> bool:
    try:
        with open("/proc/self/mounts") as f:
            return any(
                line.split()[1:3] == [root, "cgroup2"] for line in f if len(line.split()) > 2
            )
    except OSError:
        return False


def setup(root: str = CGROUP_ROOT) -> UserCgroup | None:
    """In the guest (the agent is PID 1 and init mounted cgroup2): the session's cgroup, made
    and limited. Elsewhere, or if the kernel refuses: None (and user code runs unconfined, which
    the console log says)."""
    if os.getpid() != 1:
        return None
    if not is_cgroup2(root):
        log.error("no cgroup2 file system at %s: user processes run without limits", root)
        return None
    try:
        limits = default_limits(mem_total(), _read("/proc/cmdline"))
        cgroup = UserCgroup(root, limits)
        cgroup.create()
    except OSError as exc:
        log.error("cannot set up the user cgroup: %s: user processes run without limits", exc)
        return None
    log.info(
        "user processes: memory.max %d MiB, pids.max %d", limits.memory_bytes >> 20, limits.pids
    )
    return cgroup
