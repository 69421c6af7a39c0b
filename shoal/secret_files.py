"""Secret files (API keys, passwords, private keys, URLs that carry a password): created 0600
from their first byte, and replaced atomically.

Writing a file and chmod-ing it afterwards leaves a moment in which another local user can open
it (and keep the descriptor); a half-written file can be read by a process that starts at the
wrong moment. `write_secret` avoids both: the content goes to a temporary file opened with
O_CREAT|O_EXCL and mode 0600 in the same directory, is flushed to disk, and is renamed over the
destination.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

SECRET_MODE = 0o600


def write_secret(path: Path, data: str | bytes, mode: int = SECRET_MODE) -> None:
    """Write `data` to `path`, readable by its owner only, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_secret(path: Path) -> str:
    """The stripped text of a secret file."""
    return Path(path).read_text().strip()
