"""A host's file operations on its sessions' /mnt/data: list, stat, delete, upload, download.

Part of the host runtime (workers/host.py `HostRuntime`, which provides `r`, `rb`, `host`,
`settings`, `queues`, `mark_session_lost`, `_vm` and `_done_seq`). Each runs at its session's
next free moment (workers/session_queue.py) and answers its request on a reply key; bytes move
through a Redis transfer (shoal/transfers.py), then over the agent's channel (downloads) or the
VM's transfer disk (uploads, workers/transfer_disk.py), a file of the worker's own, never
through a path the guest can name.
"""

from __future__ import annotations

import logging

from shoal import replies, sessions, transfers
from shoal.errors import HostStorageFull, SessionLost, ShoalError, from_agent
from shoal.pools import get_pool
from workers.agent_client import AgentClientError, AgentError
from workers.vm_errors import AgentRefused, VMLost, out_of_space

log = logging.getLogger("shoal.host")


class FilesOnHost:
    def file_op(self, session_id: str, op: str, args: dict, reply_key: str, pool_name: str) -> None:
        """list / stat / delete, answered on `reply_key`."""
        action = lambda vm: self._FILE_OPS[op](vm.agent, **args)  # noqa: E731
        self._reply(reply_key, action, session_id, pool_name)

    _FILE_OPS = {
        "list": lambda agent, path="", recursive=False: {
            "files": agent.list_files(path, recursive)
        },
        "stat": lambda agent, path: {"file": agent.stat(path)},
        "delete": lambda agent, path: {"deleted": agent.delete(path) or True},
    }

    def put_file(
        self, session_id: str, transfer_id: str, path: str, reply_key: str, pool_name: str
    ) -> None:
        """Stream a transfer's chunks into the guest file `path`. When the guest refuses the
        path or a write fails, the transfer is cancelled first, so the API stops sending at once
        and answers the error."""

        def put(vm) -> dict:
            try:
                return {"file": vm.put_file(path, transfers.consume(self.rb, transfer_id))}
            except BaseException:
                transfers.cancel(self.rb, transfer_id)
                raise

        self._reply(reply_key, put, session_id, pool_name)

    def get_file(
        self, session_id: str, transfer_id: str, path: str, reply_key: str, pool_name: str
    ) -> None:
        """Answer with the file's stat on `reply_key`, then stream its bytes into the transfer.

        The agent opens the file before anything is answered: a directory, a symbolic link, a
        FIFO, a socket or a device is refused on `reply_key` like any other error. A failure
        after the answer (the guest, the VM, Redis) ends the transfer with ABORT (produce), so
        the waiting request learns it at once; a client that left cancels the transfer, and the
        agent's stream is stopped."""

        def get(vm) -> dict:
            info, chunks = vm.agent.open_file(path)
            try:
                replies.send(self.r, reply_key, {"ok": True, "file": info})
                transfers.produce(self.rb, transfer_id, chunks)
            except BaseException as exc:
                log.warning("session=%s host=%s download stopped midway (%s)",
                            session_id, self.host, type(exc).__name__)  # fmt: skip
                raise
            finally:
                chunks.close()
            return {}

        self._reply(reply_key, get, session_id, pool_name, reply_on_success=False)

    def _reply(self, reply_key, action, session_id, pool_name, reply_on_success=True) -> None:
        """Run a file operation at the session's next free moment; answer on `reply_key`."""
        work = lambda: self._answer(reply_key, action, session_id, pool_name, reply_on_success)  # noqa: E731
        self.queues.other(session_id, work, lambda: self._done_seq(session_id))

    def _answer(self, reply_key, action, session_id, pool_name, reply_on_success) -> None:
        try:
            pool = get_pool(self.settings, pool_name)
            result = action(self._vm(session_id, pool))
            if reply_on_success:
                replies.send(self.r, reply_key, {"ok": True, **result})
            sessions.touch(self.r, session_id, pool.cooldown_s)
        except AgentError as exc:
            replies.send_error(self.r, reply_key, from_agent(exc.code, exc.message))
        except AgentRefused as exc:
            replies.send_error(self.r, reply_key, from_agent(exc.code, exc.agent_message))
        except AgentClientError as exc:
            # Garbage, a flood, silence or a hang-up from the guest: it is not trusted again.
            why = self.mark_session_lost(session_id, f"its agent broke the protocol: {exc}")
            replies.send_error(self.r, reply_key, SessionLost(f"the session was lost: {why}"))
        except ShoalError as exc:
            replies.send_error(self.r, reply_key, exc)
        except transfers.TransferAborted as exc:
            log.info("session=%s host=%s upload abandoned by the client", session_id, self.host)
            replies.send_error(self.r, reply_key, ShoalError(str(exc)))
        except VMLost as exc:
            why = self.mark_session_lost(session_id, str(exc))
            replies.send_error(self.r, reply_key, SessionLost(f"the session was lost: {why}"))
        except Exception as exc:  # the host's own fault: the waiting request hears it at once
            log.exception("session=%s host=%s file operation failed", session_id, self.host)
            if out_of_space(exc):  # the upload's transfer disk could not be written
                error: ShoalError = HostStorageFull(
                    f"host {self.host} has no disk space left for the upload: retry once space "
                    "is freed"
                )
            else:
                error = ShoalError(f"the file operation failed on the host ({type(exc).__name__})")
            replies.send_error(self.r, reply_key, error)
