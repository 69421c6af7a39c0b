"""Typed views of the API's objects (docs/api.md). Unknown fields are kept in `raw`, so a newer
server never breaks an older client."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal_client.errors import ExecutionFailed

FINISHED = frozenset({"succeeded", "failed", "timed_out", "cancelled", "lost"})
IMAGE_SUFFIXES = {"image/png": ".png", "image/jpeg": ".jpg", "image/svg+xml": ".svg"}


@dataclass(frozen=True)
class SessionInfo:
    id: str
    pool: str
    state: str
    identifier: str | None
    created_at: str
    expires_at: str
    raw: dict[str, Any] = field(repr=False)
    slept_at: str | None = None  # a sleeping session's: when it fell asleep
    sleep_expires_at: str | None = None  # ... and when it is deleted unless woken
    forked_from: str | None = None  # a fork's: the session it was forked of

    @classmethod
    def parse(cls, data: dict[str, Any]) -> SessionInfo:
        return cls(
            id=data["id"],
            pool=data.get("pool", ""),
            state=data.get("state", ""),
            identifier=data.get("identifier"),
            created_at=data.get("created_at", ""),
            expires_at=data.get("expires_at", ""),
            raw=data,
            slept_at=data.get("slept_at"),
            sleep_expires_at=data.get("sleep_expires_at"),
            forked_from=data.get("forked_from"),
        )


@dataclass(frozen=True)
class Execution:
    id: str
    session_id: str
    status: str
    stdout: str
    stderr: str
    result: dict[str, Any] | None
    outputs: list[dict[str, Any]]
    error: dict[str, Any] | None
    exit_code: int | None
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def parse(cls, data: dict[str, Any]) -> Execution:
        return cls(
            id=data["id"],
            session_id=data.get("session_id", ""),
            status=data.get("status", ""),
            stdout=data.get("stdout") or "",
            stderr=data.get("stderr") or "",
            result=data.get("result"),
            outputs=list(data.get("outputs") or []),
            error=data.get("error"),
            exit_code=data.get("exit_code"),
            raw=data,
        )

    @property
    def done(self) -> bool:
        return self.status in FINISHED

    @property
    def text(self) -> str | None:
        """The last expression's plain-text value (`None` when the code had none)."""
        return (self.result or {}).get("text/plain")

    def raise_for_status(self) -> Execution:
        """This execution, or ExecutionFailed when it did not succeed (its error named)."""
        if self.status == "succeeded":
            return self
        what = self.error or {}
        detail = f"{what.get('name')}: {what.get('value')}" if what else self.stderr[-500:]
        raise ExecutionFailed(f"Execution{self.status.title().replace('_', '')}", detail)

    def images(self) -> list[tuple[str, bytes]]:
        """(MIME type, bytes) of every image the code displayed, then of its result."""
        bundles = [o.get("data") or {} for o in self.outputs] + [self.result or {}]
        found = []
        for bundle in bundles:
            for mime in IMAGE_SUFFIXES:
                if isinstance(bundle.get(mime), str):
                    data = bundle[mime]
                    found.append((mime, data.encode() if mime.endswith("xml") else
                                  base64.b64decode(data)))  # fmt: skip
        return found

    def save_images(self, directory: str | Path, stem: str = "output") -> list[Path]:
        """Write every image to `directory` as stem-N.png (or .jpg, .svg); the paths written."""
        target = Path(directory)
        target.mkdir(parents=True, exist_ok=True)
        paths = []
        for n, (mime, data) in enumerate(self.images()):
            path = target / f"{stem}-{n}{IMAGE_SUFFIXES[mime]}"
            path.write_bytes(data)
            paths.append(path)
        return paths


@dataclass(frozen=True)
class FileEntry:
    path: str
    name: str
    type: str
    size: int
    modified_at: str

    @classmethod
    def parse(cls, data: dict[str, Any]) -> FileEntry:
        return cls(
            path=data["path"],
            name=data.get("name", ""),
            type=data.get("type", ""),
            size=int(data.get("size", 0)),
            modified_at=data.get("modified_at", ""),
        )


@dataclass(frozen=True)
class BatchItem:
    index: int
    status: str
    execution: Execution | None
    files: dict[str, bytes]  # collected files, decoded
    error: str | None
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def parse(cls, data: dict[str, Any]) -> BatchItem:
        execution = data.get("execution")
        return cls(
            index=int(data["index"]),
            status=data.get("status", ""),
            execution=Execution.parse(execution) if isinstance(execution, dict) else None,
            files={k: base64.b64decode(v) for k, v in (data.get("files") or {}).items()},
            error=data.get("error"),
            raw=data,
        )

    @property
    def done(self) -> bool:
        return self.status not in ("pending", "running")
