"""The synchronous client: `Client` and the `Session` it hands out."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from shoal_client import _core, _files
from shoal_client._core import Call, Config
from shoal_client.models import BatchItem, Execution, FileEntry, SessionInfo

POLL_S = 0.2


class Client:
    """`Client(url, api_key)`, or SHOAL_URL / SHOAL_API_KEY (and SHOAL_CA_FILE for a
    self-signed HTTPS listener). Connection errors and 429/503 answers are retried, honouring
    `Retry-After`; a submitted execution carries an Idempotency-Key, so a retry never runs code
    twice."""

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout_s: float = 120.0,
        max_retries: int = 4,
        ca_file: str | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.config = Config.resolve(url, api_key, timeout_s, max_retries, ca_file)
        self._http = httpx.Client(**self.config.http_options(), transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the transport ------------------------------------------------------------------------
    def _send(
        self, call: Call, source: _files.Source | None = None, stream: bool = False
    ) -> httpx.Response:
        tries = _core.Attempts(call, source, self.config)
        while True:
            try:
                request = self._http.build_request(**tries.request_args(for_async=False))
                response = self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                delay = tries.after_failure(exc)
            else:
                retry_after = response.headers.get("Retry-After")
                delay = tries.after_answer(response.status_code, retry_after)
                if delay is None:
                    if response.status_code >= 400:
                        response.read()
                        _core.check(response.status_code, _json_of(response), retry_after)
                    return response
                response.close()
            time.sleep(delay)

    def _json(self, call: Call, source: _files.Source | None = None) -> Any:
        response = self._send(call, source)
        return response.json() if response.content else None

    # --- sessions -----------------------------------------------------------------------------
    def create_session(self, pool: str = "default") -> Session:
        return Session(self, SessionInfo.parse(self._json(_core.create_session(pool))))

    def session(self, pool: str = "default") -> Session:
        """A new session; as a context manager it is deleted on exit."""
        return self.create_session(pool)

    def get_session(self, session_id: str) -> SessionInfo:
        return SessionInfo.parse(self._json(_core.get_session(session_id)))

    def list_sessions(self) -> list[SessionInfo]:
        return [SessionInfo.parse(s) for s in self._json(_core.list_sessions())["sessions"]]

    def delete_session(self, session_id: str) -> None:
        self._send(_core.delete_session(session_id))

    def sleep_session(self, session_id: str) -> SessionInfo:
        """Save the session's VM to its host's disk; its state reads `sleeping` once saved, and
        the next request wakes it with its variables and files (docs/api.md)."""
        return SessionInfo.parse(self._json(_core.sleep_session(session_id)))

    def wake_session(self, session_id: str) -> SessionInfo:
        """Wake a sleeping session ahead of the next request (which would wake it anyway)."""
        return SessionInfo.parse(self._json(_core.wake_session(session_id)))

    def fork_session(self, session_id: str, count: int = 1) -> list[Session]:
        """`count` new sessions (1 to 16) whose variables and files are the session's at this
        instant; it runs on (docs/api.md, "Forks")."""
        answer = self._json(_core.fork_session(session_id, count))
        return [Session(self, SessionInfo.parse(s)) for s in answer["sessions"]]

    # --- executions ---------------------------------------------------------------------------
    def submit(
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
        """Queue code in the session; the execution as it stands (poll with `wait_for`)."""
        call = _core.submit(
            session_id, code, language, timeout_s, wait, max_output, idempotency_key
        )
        return Execution.parse(self._json(call))

    def run(self, session_id: str, code: str, language: str = "python", **kw: Any) -> Execution:
        """Run code and return the finished execution (code that raises is not an exception:
        see `Execution.status`, or call `.raise_for_status()`)."""
        execution = self.submit(session_id, code, language, wait=True, **kw)
        return execution if execution.done else self.wait_for(execution.id)

    def get_execution(self, execution_id: str) -> Execution:
        return Execution.parse(self._json(_core.get_execution(execution_id)))

    def wait_for(self, execution_id: str, timeout_s: float | None = None) -> Execution:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            execution = self.get_execution(execution_id)
            if execution.done or (deadline is not None and time.monotonic() > deadline):
                return execution
            time.sleep(POLL_S)

    def cancel(self, execution_id: str) -> Execution:
        return Execution.parse(self._json(_core.cancel_execution(execution_id)))

    # --- files --------------------------------------------------------------------------------
    def upload(self, session_id: str, path: str, source: _files.Source) -> FileEntry:
        """Put `source` (bytes, a local path, or a binary file object) at `path` under
        /mnt/data; streamed in chunks."""
        return FileEntry.parse(self._json(_core.file_call("PUT", session_id, path), source))

    def download(self, session_id: str, path: str) -> bytes:
        response = self._send(_core.file_call("GET", session_id, path))
        _files.expect_length(len(response.content), response.headers.get("Content-Length"), path)
        return response.content

    def download_to(self, session_id: str, path: str, dest: str | Path) -> Path:
        """Stream a file to `dest` (the client holds one chunk at a time); on any failure
        `dest` is left as it was."""
        target = Path(dest)
        response = self._send(_core.file_call("GET", session_id, path), stream=True)
        received = 0
        try:
            with _files.replaced_atomically(target) as f:
                for chunk in response.iter_bytes(_files.CHUNK):
                    f.write(chunk)
                    received += len(chunk)
                _files.expect_length(received, response.headers.get("Content-Length"), path)
        except httpx.TransportError as exc:
            raise _core.connection_error(exc, self.config.url) from exc
        finally:
            response.close()
        return target

    def list_files(self, session_id: str, path: str = "", recursive: bool = False) -> list:
        answer = self._json(_core.list_files(session_id, path, recursive))
        return [FileEntry.parse(f) for f in answer["files"]]

    def delete_file(self, session_id: str, path: str) -> None:
        self._send(_core.file_call("DELETE", session_id, path))

    # --- batches ------------------------------------------------------------------------------
    def submit_batch(
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
        return self._json(call)

    def get_batch(self, batch_id: str) -> dict[str, Any]:
        """The batch with every item (its pages followed)."""
        batch = self._json(_core.get_batch(batch_id))
        while batch.get("next_cursor") is not None:
            page = self._json(_core.get_batch(batch_id, batch["next_cursor"]))
            batch = {**page, "items": batch["items"] + page["items"]}
        return batch

    def iter_batch(self, batch_id: str, poll_s: float = 0.5) -> Iterator[BatchItem]:
        """Each item once, as it finishes, until the batch is over."""
        seen: set[int] = set()
        while True:
            batch = self.get_batch(batch_id)
            yield from _core.newly_finished(batch, seen)
            if _core.batch_over(batch, seen):
                return
            time.sleep(poll_s)

    def cancel_batch(self, batch_id: str) -> dict[str, Any]:
        return self._json(_core.cancel_batch(batch_id))

    # --- pools and usage ----------------------------------------------------------------------
    def pools(self) -> list[dict[str, Any]]:
        return self._json(_core.pools())["pools"]

    def pool(self, name: str) -> dict[str, Any]:
        return self._json(_core.pools(name))

    def usage(self) -> dict[str, Any]:
        return self._json(_core.usage())


class Session:
    """One session: run code in it, move its files; `with` deletes it on exit."""

    def __init__(self, client: Client, info: SessionInfo) -> None:
        self.client = client
        self.info = info
        self.id = info.id
        self.files = SessionFiles(client, info.id)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.delete()

    def run(self, code: str, **kw: Any) -> Execution:
        return self.client.run(self.id, code, **kw)

    def shell(self, command: str, **kw: Any) -> Execution:
        return self.client.run(self.id, command, "shell", **kw)

    def submit(self, code: str, **kw: Any) -> Execution:
        return self.client.submit(self.id, code, **kw)

    def refresh(self) -> SessionInfo:
        self.info = self.client.get_session(self.id)
        return self.info

    def sleep(self) -> SessionInfo:
        self.info = self.client.sleep_session(self.id)
        return self.info

    def wake(self) -> SessionInfo:
        self.info = self.client.wake_session(self.id)
        return self.info

    def fork(self, count: int = 1) -> list[Session]:
        return self.client.fork_session(self.id, count)

    def delete(self) -> None:
        self.client.delete_session(self.id)


class SessionFiles:
    def __init__(self, client: Client, session_id: str) -> None:
        self.client, self.session_id = client, session_id

    def upload(self, path: str, source: _files.Source) -> FileEntry:
        return self.client.upload(self.session_id, path, source)

    def download(self, path: str) -> bytes:
        return self.client.download(self.session_id, path)

    def download_to(self, path: str, dest: str | Path) -> Path:
        return self.client.download_to(self.session_id, path, dest)

    def list(self, path: str = "", recursive: bool = False) -> list[FileEntry]:
        return self.client.list_files(self.session_id, path, recursive)

    def delete(self, path: str) -> None:
        self.client.delete_file(self.session_id, path)


def _json_of(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None
