"""The asyncio client: `AsyncClient` and its `AsyncSession`, the same surface as `Client`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from shoal_client import _core, _files
from shoal_client._core import Call, Config
from shoal_client.client import POLL_S, _json_of
from shoal_client.models import BatchItem, Execution, FileEntry, SessionInfo


class AsyncClient:
    """`async with AsyncClient(url, api_key) as client:`; see `Client`."""

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout_s: float = 120.0,
        max_retries: int = 4,
        ca_file: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.config = Config.resolve(url, api_key, timeout_s, max_retries, ca_file)
        self._http = httpx.AsyncClient(**self.config.http_options(), transport=transport)

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- the transport ------------------------------------------------------------------------
    async def _send(
        self, call: Call, source: _files.Source | None = None, stream: bool = False
    ) -> httpx.Response:
        tries = _core.Attempts(call, source, self.config)
        while True:
            try:
                request = self._http.build_request(**tries.request_args(for_async=True))
                response = await self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                delay = tries.after_failure(exc)
            else:
                retry_after = response.headers.get("Retry-After")
                delay = tries.after_answer(response.status_code, retry_after)
                if delay is None:
                    if response.status_code >= 400:
                        await response.aread()
                        _core.check(response.status_code, _json_of(response), retry_after)
                    return response
                await response.aclose()
            await asyncio.sleep(delay)

    async def _json(self, call: Call, source: _files.Source | None = None) -> Any:
        response = await self._send(call, source)
        return response.json() if response.content else None

    # --- sessions -----------------------------------------------------------------------------
    async def create_session(self, pool: str = "default") -> AsyncSession:
        info = SessionInfo.parse(await self._json(_core.create_session(pool)))
        return AsyncSession(self, info)

    async def session(self, pool: str = "default") -> AsyncSession:
        """A new session; `async with await client.session() as s:` deletes it on exit."""
        return await self.create_session(pool)

    async def get_session(self, session_id: str) -> SessionInfo:
        return SessionInfo.parse(await self._json(_core.get_session(session_id)))

    async def list_sessions(self) -> list[SessionInfo]:
        answer = await self._json(_core.list_sessions())
        return [SessionInfo.parse(s) for s in answer["sessions"]]

    async def delete_session(self, session_id: str) -> None:
        await self._send(_core.delete_session(session_id))

    async def sleep_session(self, session_id: str) -> SessionInfo:
        """Save the session's VM to its host's disk; its state reads `sleeping` once saved, and
        the next request wakes it with its variables and files (docs/api.md)."""
        return SessionInfo.parse(await self._json(_core.sleep_session(session_id)))

    async def wake_session(self, session_id: str) -> SessionInfo:
        """Wake a sleeping session ahead of the next request (which would wake it anyway)."""
        return SessionInfo.parse(await self._json(_core.wake_session(session_id)))

    async def fork_session(self, session_id: str, count: int = 1) -> list[AsyncSession]:
        """`count` new sessions (1 to 16) whose variables and files are the session's at this
        instant; it runs on (docs/api.md, "Forks")."""
        answer = await self._json(_core.fork_session(session_id, count))
        return [AsyncSession(self, SessionInfo.parse(s)) for s in answer["sessions"]]

    # --- executions ---------------------------------------------------------------------------
    async def submit(
        self,
        session_id: str,
        code: str,
        language: str = "python",
        *,
        timeout_s: float = 60,
        max_output: int | None = None,
        idempotency_key: str | None = None,
        wait: bool = False,
    ) -> Execution:
        call = _core.submit(
            session_id, code, language, timeout_s, wait, max_output, idempotency_key
        )
        return Execution.parse(await self._json(call))

    async def run(
        self, session_id: str, code: str, language: str = "python", **kw: Any
    ) -> Execution:
        execution = await self.submit(session_id, code, language, wait=True, **kw)
        return execution if execution.done else await self.wait_for(execution.id)

    async def get_execution(self, execution_id: str) -> Execution:
        return Execution.parse(await self._json(_core.get_execution(execution_id)))

    async def wait_for(self, execution_id: str, timeout_s: float | None = None) -> Execution:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            execution = await self.get_execution(execution_id)
            if execution.done or (deadline is not None and time.monotonic() > deadline):
                return execution
            await asyncio.sleep(POLL_S)

    async def cancel(self, execution_id: str) -> Execution:
        return Execution.parse(await self._json(_core.cancel_execution(execution_id)))

    # --- files --------------------------------------------------------------------------------
    async def upload(self, session_id: str, path: str, source: _files.Source) -> FileEntry:
        call = _core.file_call("PUT", session_id, path)
        return FileEntry.parse(await self._json(call, source))

    async def download(self, session_id: str, path: str) -> bytes:
        response = await self._send(_core.file_call("GET", session_id, path))
        _files.expect_length(len(response.content), response.headers.get("Content-Length"), path)
        return response.content

    async def download_to(self, session_id: str, path: str, dest: str | Path) -> Path:
        """Stream a file to `dest`; on any failure `dest` is left as it was."""
        target = Path(dest)
        response = await self._send(_core.file_call("GET", session_id, path), stream=True)
        received = 0
        try:
            with _files.replaced_atomically(target) as f:
                async for chunk in response.aiter_bytes(_files.CHUNK):
                    await asyncio.to_thread(f.write, chunk)
                    received += len(chunk)
                _files.expect_length(received, response.headers.get("Content-Length"), path)
        except httpx.TransportError as exc:
            raise _core.connection_error(exc, self.config.url) from exc
        finally:
            await response.aclose()
        return target

    async def list_files(
        self, session_id: str, path: str = "", recursive: bool = False
    ) -> list[FileEntry]:
        answer = await self._json(_core.list_files(session_id, path, recursive))
        return [FileEntry.parse(f) for f in answer["files"]]

    async def delete_file(self, session_id: str, path: str) -> None:
        await self._send(_core.file_call("DELETE", session_id, path))

    # --- batches ------------------------------------------------------------------------------
    async def submit_batch(
        self,
        items: list[dict[str, Any]],
        pool: str | None = None,
        *,
        max_parallel: int = 8,
        callback_url: str | None = None,
        from_session: str | None = None,
    ) -> dict[str, Any]:
        """Start a batch (items from `shoal_client.batch_item(...)`, or dicts as the API takes
        them) in `pool` (the server's default: `default`), or with `from_session`, each item in
        a fork of that session; the batch object, its `id` to follow with `iter_batch`."""
        call = _core.submit_batch(items, pool, max_parallel, callback_url, from_session)
        return await self._json(call)

    async def get_batch(self, batch_id: str) -> dict[str, Any]:
        """The batch with every item (its pages followed)."""
        batch = await self._json(_core.get_batch(batch_id))
        while batch.get("next_cursor") is not None:
            page = await self._json(_core.get_batch(batch_id, batch["next_cursor"]))
            batch = {**page, "items": batch["items"] + page["items"]}
        return batch

    async def iter_batch(self, batch_id: str, poll_s: float = 0.5) -> AsyncIterator[BatchItem]:
        """Each item once, as it finishes, until the batch is over."""
        seen: set[int] = set()
        while True:
            batch = await self.get_batch(batch_id)
            for item in _core.newly_finished(batch, seen):
                yield item
            if _core.batch_over(batch, seen):
                return
            await asyncio.sleep(poll_s)

    async def cancel_batch(self, batch_id: str) -> dict[str, Any]:
        return await self._json(_core.cancel_batch(batch_id))

    # --- pools and usage ----------------------------------------------------------------------
    async def pools(self) -> list[dict[str, Any]]:
        return (await self._json(_core.pools()))["pools"]

    async def pool(self, name: str) -> dict[str, Any]:
        return await self._json(_core.pools(name))

    async def usage(self) -> dict[str, Any]:
        return await self._json(_core.usage())


class AsyncSession:
    def __init__(self, client: AsyncClient, info: SessionInfo) -> None:
        self.client = client
        self.info = info
        self.id = info.id
        self.files = AsyncSessionFiles(client, info.id)

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.delete()

    async def run(self, code: str, **kw: Any) -> Execution:
        return await self.client.run(self.id, code, **kw)

    async def shell(self, command: str, **kw: Any) -> Execution:
        return await self.client.run(self.id, command, "shell", **kw)

    async def submit(self, code: str, **kw: Any) -> Execution:
        return await self.client.submit(self.id, code, **kw)

    async def refresh(self) -> SessionInfo:
        self.info = await self.client.get_session(self.id)
        return self.info

    async def sleep(self) -> SessionInfo:
        self.info = await self.client.sleep_session(self.id)
        return self.info

    async def wake(self) -> SessionInfo:
        self.info = await self.client.wake_session(self.id)
        return self.info

    async def fork(self, count: int = 1) -> list[AsyncSession]:
        return await self.client.fork_session(self.id, count)

    async def delete(self) -> None:
        await self.client.delete_session(self.id)


class AsyncSessionFiles:
    def __init__(self, client: AsyncClient, session_id: str) -> None:
        self.client, self.session_id = client, session_id

    async def upload(self, path: str, source: _files.Source) -> FileEntry:
        return await self.client.upload(self.session_id, path, source)

    async def download(self, path: str) -> bytes:
        return await self.client.download(self.session_id, path)

    async def download_to(self, path: str, dest: str | Path) -> Path:
        return await self.client.download_to(self.session_id, path, dest)

    async def list(self, path: str = "", recursive: bool = False) -> list[FileEntry]:
        return await self.client.list_files(self.session_id, path, recursive)

    async def delete(self, path: str) -> None:
        await self.client.delete_file(self.session_id, path)
