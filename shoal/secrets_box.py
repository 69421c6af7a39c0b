"""Secrets Shoal must be able to use again (webhook signing secrets), sealed at rest.

API keys are stored only as hashes, but a webhook secret signs every delivery, so it is kept
encrypted with a server key (Fernet: AES-128-CBC with HMAC-SHA256). The key is SHOAL_SECRET_KEY
when set (a urlsafe-base64 32-byte Fernet key, the same on every API and worker host); otherwise
one is generated once under SHOAL_HOME/secret.key with mode 0600, which suits one machine.
Whoever reads Redis alone cannot sign webhooks; whoever has both can.
"""

from __future__ import annotations

import os
import time
from functools import lru_cache
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from shoal.settings import Settings

KEY_FILE = "secret.key"


def key_path(settings: Settings) -> Path:
    return Path(settings.home) / KEY_FILE


def _key_from_file(path: Path) -> bytes:
    """The key in `path`, made with O_EXCL on first use so two processes agree on one key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for _ in range(50):  # another process made it a moment ago and may still be writing
            key = path.read_bytes().strip()
            if key:
                return key
            time.sleep(0.02)
        raise SystemExit(f"{path} is empty: delete it or set SHOAL_SECRET_KEY") from None
    key = Fernet.generate_key()
    with os.fdopen(fd, "wb") as f:
        f.write(key + b"\n")
    return key


@lru_cache(maxsize=4)
def _fernet(settings: Settings) -> Fernet:
    key = settings.secret_key.encode() if settings.secret_key else None
    try:
        return Fernet(key or _key_from_file(key_path(settings)))
    except ValueError:
        raise SystemExit(
            "SHOAL_SECRET_KEY is not a Fernet key (32 bytes, urlsafe base64); make one with "
            "`python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key())'`"
        ) from None


def seal(settings: Settings, plaintext: str) -> str:
    return _fernet(settings).encrypt(plaintext.encode()).decode()


def open_sealed(settings: Settings, token: str) -> str:
    """The plaintext; ValueError when `token` was sealed under another server key."""
    try:
        return _fernet(settings).decrypt(token.encode()).decode()
    except InvalidToken:
        raise ValueError(
            "a sealed secret does not open with this server key (SHOAL_SECRET_KEY changed?)"
        ) from None
