"""Hardening of a staged guest root: no setuid or setgid file, no file capability.

User code runs as an unprivileged user in the guest; a setuid `su` or `mount` (Debian ships both)
is a door to root that nothing in a Shoal guest uses (the agent is root already). So the final
layer clears the set-user-ID and set-group-ID bits of every file and directory in the staged root
and drops `security.capability` attributes. Files are rewritten, never changed through their hard
links into the base layer (shoal/ops/image_fs.py).
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

SETID = stat.S_ISUID | stat.S_ISGID
CAPABILITY_XATTR = "security.capability"


def _has_capability(path: str) -> bool:
    try:
        return CAPABILITY_XATTR in os.listxattr(path, follow_symlinks=False)
    except OSError:
        return False


def _rewrite(path: str, st: os.stat_result) -> None:
    """Replace a regular file by a copy of itself with the setid bits cleared and no xattrs."""
    tmp = path + ".shoal-harden"
    shutil.copyfile(path, tmp, follow_symlinks=False)
    os.chown(tmp, st.st_uid, st.st_gid)
    os.chmod(tmp, stat.S_IMODE(st.st_mode) & ~SETID)
    os.replace(tmp, path)


def strip_privileges(rootfs: Path) -> list[str]:
    """Clear setuid/setgid bits and file capabilities under rootfs; return what changed
    ("/usr/bin/su", ...), for the build log and the manifest."""
    changed = []
    for dirpath, dirnames, filenames in os.walk(rootfs):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                continue
            setid = st.st_mode & SETID
            if stat.S_ISDIR(st.st_mode):
                if setid:  # directories are not hard-linked: chmod is safe
                    os.chmod(path, stat.S_IMODE(st.st_mode) & ~SETID)
                    changed.append(path)
            elif stat.S_ISREG(st.st_mode) and (setid or _has_capability(path)):
                _rewrite(path, st)
                changed.append(path)
    return sorted("/" + os.path.relpath(p, rootfs) for p in changed)
