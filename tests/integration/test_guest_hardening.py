"""The hardened guest, seen from user code (docs/security.md, "The hardened guest"): code runs in
a real session on the shared stack and tries what an attacker would; each test asserts what it
gets. No user namespaces, no setuid or setgid file, no access to the transfer disk, no ptrace,
no other user's process in /proc; every user process in the session's cgroup, a fork bomb and an
allocation past the memory limit contained (the agent survives, the session stays usable),
background processes ended by the rule in docs/limits.md ("Inside the guest").

One session for the module, used in order: the memory test restarts its interpreter.
"""

from __future__ import annotations

import json
import time

import pytest
import requests

from tests.integration.conftest import Stack

SANDBOX_UID = 1000
USER_CGROUP = "/sys/fs/cgroup/shoal-user"


@pytest.fixture(scope="module")
def session(stack: Stack):
    session_id = stack.new_session()
    yield session_id
    requests.delete(f"{stack.url}/v1/sessions/{session_id}", headers=stack.headers(), timeout=60)


def py(stack: Stack, session: str, code: str, **body) -> str:
    """Run Python in the session; it must succeed. Its stdout."""
    answer = stack.execute(session, code, **body)
    assert answer["status"] == "succeeded", answer
    return answer["stdout"]


def sh(stack: Stack, session: str, code: str, **body) -> dict:
    return stack.execute(session, code, language="shell", **body)


def test_user_namespaces_are_refused(stack: Stack, session: str):
    answer = sh(stack, session, "unshare -U -r id")
    assert answer["status"] == "failed" and answer["exit_code"] != 0, answer
    assert "uid=0" not in answer["stdout"]
    out = py(
        stack,
        session,
        "import ctypes, os\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "for flag in (0x10000000, 0x10000000 | 0x00020000):  # CLONE_NEWUSER, + CLONE_NEWNS\n"
        "    print(libc.unshare(flag), ctypes.get_errno() != 0)\n"
        "print(open('/proc/sys/user/max_user_namespaces').read().strip())\n"
        "print(os.getuid())",
    )
    assert out.split("\n") == ["-1 True", "-1 True", "0", str(SANDBOX_UID), ""]


def test_no_setuid_or_setgid_file(stack: Stack, session: str):
    answer = sh(stack, session, "find / -xdev -perm /6000 2>/dev/null; true", timeout_s=120)
    assert answer["status"] == "succeeded" and answer["stdout"] == "", answer
    su = sh(stack, session, "stat -c %A /usr/bin/su")["stdout"]
    assert su == "-rwxr-xr-x\n", su  # still there, no longer setuid
    assert sh(stack, session, "su -c id root")["exit_code"] != 0


def test_user_code_cannot_read_or_write_the_transfer_disk(stack: Stack, session: str):
    # The disk uploads come in by (docs/agent-protocol.md): root's alone in the guest, and
    # read-only to the guest as a whole.
    out = py(
        stack,
        session,
        "import os\n"
        "names = [n for n in os.listdir('/sys/block')\n"
        "         if os.path.exists(f'/sys/block/{n}/serial')\n"
        "         if open(f'/sys/block/{n}/serial').read().strip() == 'shoal-transfer']\n"
        "print(names, open(f'/sys/block/{names[0]}/ro').read().strip())\n"
        "for mode in (os.O_RDONLY, os.O_WRONLY):\n"
        "    try:\n"
        "        os.open('/dev/' + names[0], mode)\n"
        "        print('opened')\n"
        "    except PermissionError:\n"
        "        print('refused')",
    )
    assert out == "['vdc'] 1\nrefused\nrefused\n", out


def test_ptrace_is_refused(stack: Stack, session: str):
    out = py(
        stack,
        session,
        "import ctypes, subprocess\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "child = subprocess.Popen(['sleep', '60'])\n"
        "print(libc.ptrace(16, child.pid, None, None), ctypes.get_errno())  # PTRACE_ATTACH\n"
        "child.kill(); child.wait()\n"
        "print(open('/proc/sys/kernel/yama/ptrace_scope').read().strip())",
    )
    assert out.split("\n") == ["-1 1", "2", ""]  # EPERM even for its own child


def test_proc_shows_only_the_users_processes(stack: Stack, session: str):
    out = py(
        stack,
        session,
        "import os\n"
        "pids = [p for p in os.listdir('/proc') if p.isdigit()]\n"
        "print(sorted({os.stat(f'/proc/{p}').st_uid for p in pids}))\n"
        "print(str(os.getpid()) in pids, '1' in pids, os.path.exists('/proc/1/status'))",
    )
    assert out == f"[{SANDBOX_UID}]\nTrue False False\n"
    # The shell sees the same: only the sandbox user's processes.
    answer = sh(stack, session, "ps -eo user= | sort -u")
    assert answer["stdout"] == "sandbox\n", answer


def test_user_processes_are_in_the_session_cgroup_with_limits(stack: Stack, session: str):
    out = py(
        stack,
        session,
        "import subprocess\n"
        "print(open('/proc/self/cgroup').read().strip())\n"
        "print(subprocess.run(['cat', '/proc/self/cgroup'], capture_output=True, text=True)"
        ".stdout.strip())\n"
        f"print(open('{USER_CGROUP}/pids.max').read().strip())\n"
        f"print(int(open('{USER_CGROUP}/memory.max').read()) >> 20)\n"
        "print(int(open('/proc/meminfo').readline().split()[1]) >> 10)",
    )
    own, child, pids_max, memory_mib, total_mib = out.split()
    assert own == child == "0::/shoal-user/kernel"
    assert pids_max == "256"
    assert int(total_mib) - int(memory_mib) >= 128  # headroom for the agent
    assert int(memory_mib) >= 256, (memory_mib, total_mib)
    assert sh(stack, session, "cat /proc/self/cgroup")["stdout"] == "0::/shoal-user/shell\n"
    # User code can neither leave the group nor raise its limits.
    out = py(
        stack,
        session,
        "for path, value in (('/sys/fs/cgroup/cgroup.procs', '0'),\n"
        f"                    ('{USER_CGROUP}/kernel/../memory.max', 'max'),\n"
        f"                    ('{USER_CGROUP}/pids.max', 'max')):\n"
        "    try:\n"
        "        open(path, 'w').write(value)\n"
        "        print('wrote', path)\n"
        "    except OSError as exc:\n"
        "        print(type(exc).__name__)",
    )
    assert out == "PermissionError\n" * 3


def test_the_scientific_stack_fits_in_the_limit(stack: Stack, session: str):
    out = py(
        stack,
        session,
        "import matplotlib.pyplot as plt, numpy as np, pandas as pd, scipy.linalg\n"
        "import sklearn.linear_model\n"
        "df = pd.DataFrame(np.random.rand(200_000, 8))\n"
        "m = sklearn.linear_model.LinearRegression().fit(df.iloc[:, :7], df[7])\n"
        "plt.plot(df[0][:1000]); plt.show()\n"
        f"stat = dict(line.split() for line in open('{USER_CGROUP}/memory.stat'))\n"
        f"events = dict(line.split() for line in open('{USER_CGROUP}/memory.events'))\n"
        "print(int(stat['anon']) >> 20, events['oom_kill'])\n"
        f"print(int(open('{USER_CGROUP}/memory.max').read()) >> 20)\n"
        "print(int(open('/proc/meminfo').readline().split()[1]) >> 10)",
        timeout_s=120,
    )
    anon, oom_kills, limit, total = map(int, out.split())
    print(f"guest MemTotal {total} MiB, memory.max {limit} MiB, anon with the stack {anon} MiB")
    assert oom_kills == 0
    assert anon < limit // 2, (anon, limit)  # (page cache fills the rest, and is reclaimed)


def test_a_fork_bomb_is_contained(stack: Stack, session: str):
    py(stack, session, "kept = 42")
    started = time.monotonic()
    answer = sh(stack, session, ":(){ :|:& };:; sleep 100", timeout_s=6)
    assert answer["status"] == "timed_out", answer  # the agent kept its own time
    assert time.monotonic() - started < 30
    out = py(
        stack,
        session,
        "import time\n"
        "for _ in range(100):\n"
        f"    if not open('{USER_CGROUP}/shell/cgroup.procs').read():\n"
        "        break\n"
        "    time.sleep(0.1)\n"
        f"print(len(open('{USER_CGROUP}/shell/cgroup.procs').read().split()))\n"
        f"print(open('{USER_CGROUP}/pids.events').read().split())\n"
        "print(kept)",
    )
    left, events, kept = out.split("\n")[:3]
    assert left == "0"  # the bomb is gone, all of it
    assert events.startswith("['max', '") and events != "['max', '0']"  # it hit pids.max
    assert kept == "42"  # the interpreter was not touched


def test_memory_past_the_limit_restarts_the_interpreter_only(stack: Stack, session: str):
    py(stack, session, "kept = 42")
    answer = stack.execute(
        session,
        "chunks = []\nwhile True:\n    chunks.append(b'x' * (16 << 20))",
        timeout_s=120,
    )
    assert answer["status"] == "failed", answer
    assert answer["interpreter_restarted"] is True
    assert answer["error"]["name"] == "InterpreterRestarted"
    assert "memory limit" in answer["error"]["value"], answer["error"]
    # The agent survived and the session works, in a fresh interpreter.
    out = py(
        stack,
        session,
        f"print('kept' in dir())\nprint(open('{USER_CGROUP}/kernel/memory.events').read().split())",
    )
    fresh, events = out.split("\n")[:2]
    assert fresh == "False"
    assert "'oom_group_kill', '0'" not in events, events


def alive(stack: Stack, session: str, pids: list[int], wait_gone: bool = False) -> list[bool]:
    """Which pids still run (a zombie counts as gone), polling up to 10 s if wait_gone."""
    out = py(
        stack,
        session,
        "import time\n"
        "def alive(p):\n"
        "    try:\n"
        "        return open(f'/proc/{p}/stat').read().split()[2] != 'Z'\n"
        "    except OSError:\n"
        "        return False\n"
        f"for _ in range(100 if {wait_gone} else 1):\n"
        f"    if not any(alive(p) for p in {pids}):\n"
        "        break\n"
        "    time.sleep(0.1)\n"
        f"print([alive(p) for p in {pids}])",
    )
    return json.loads(out.lower())  # "[true, false]"


def test_background_processes_belong_to_the_session(stack: Stack, session: str):
    # Started from Python, detached every way there is: still in the kernel's group.
    out = py(
        stack,
        session,
        "import os, subprocess, time\n"
        "a = subprocess.Popen(['sleep', '1000'], start_new_session=True).pid\n"
        "r, w = os.pipe()\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        os.write(w, str(os.getpid()).encode())\n"
        "        os.execvp('sleep', ['sleep', '1000'])\n"
        "    os._exit(0)\n"
        "b = int(os.read(r, 32))\n"
        "time.sleep(0.2)\n"
        "print(a, b)\n"
        "for p in (a, b):\n"
        "    print(open(f'/proc/{p}/cgroup').read().strip())",
    )
    a, b, cgroup_a, cgroup_b = out.split("\n")[0].split() + out.split("\n")[1:3]
    assert cgroup_a == cgroup_b == "0::/shoal-user/kernel"
    # Left running by a shell command: it ends with the command, however it detached.
    answer = sh(stack, session, "setsid nohup sleep 1000 >/dev/null 2>&1 & echo $!")
    assert answer["status"] == "succeeded", answer
    s = int(answer["stdout"])
    assert alive(stack, session, [s], wait_gone=True) == [False]
    pids = [int(a), int(b)]
    assert alive(stack, session, pids) == [True, True]
    counted = py(stack, session, f"print(open('{USER_CGROUP}/pids.current').read())")
    assert int(counted) >= 3  # the two and the interpreter: counted in the session's pids limit
    # The interpreter ends: what Python started ends with it.
    died = stack.execute(session, "import os\nos._exit(3)")
    assert died["interpreter_restarted"] is True, died
    assert alive(stack, session, pids, wait_gone=True) == [False, False]
