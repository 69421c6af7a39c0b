"""Every Celery task Shoal sends, declared once: its name, its queue, its keyword arguments and
how long it may wait in a queue before it is dropped.

Senders call `TASK.send(celery, host=..., **kwargs)`; the worker processes register their
implementations under `TASK.name` (workers/tasks.py, workers/async_tasks.py). No other module
writes a task name. Tasks take ids and names, never objects: a pool travels by its name and the
worker reads its definition from its own configuration (shoal/pools.py).

The margins a sender adds to a deadline before it gives up waiting are computed here too, so the
API, the batch coordinator and beat agree on them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shoal.keys import host_queue

if TYPE_CHECKING:
    from celery import Celery

    from shoal.settings import Settings

WEBHOOK_QUEUE = "shoal.webhooks"
BATCH_QUEUE = "shoal.batches"

# A host's backlog older than this is dropped rather than run long after the client gave up.
TASK_EXPIRY_S = 600
# Sessions are made synchronously: the host gets this long beyond the agent's own deadline.
CREATE_MARGIN_S = 30
# What a fork request's waiter allows per fork beyond one VM's start (they start a few at a time).
FORK_START_S = 5
# A waiter gives an execution this long beyond its timeout and the interrupt grace: queueing
# on the host and the VM kill that may follow.
EXECUTION_WAIT_MARGIN_S = 30
# Beat asks each live host to top up its ready pools this often; an older request is useless.
REPLENISH_EXPIRY_S = 5


@dataclass(frozen=True)
class Task:
    """One task: `queue` None means the queue of the host named when it is sent."""

    name: str
    arguments: tuple[str, ...]
    queue: str | None = None
    expires_s: float | None = TASK_EXPIRY_S

    def send(
        self,
        celery: Celery,
        *,
        host: str | None = None,
        expires_s: float | None = None,
        countdown: float | None = None,
        **kwargs: Any,
    ) -> None:
        if set(kwargs) != set(self.arguments):
            raise TypeError(f"{self.name} takes {self.arguments}, got {tuple(kwargs)}")
        if self.queue is None and not host:
            raise TypeError(f"{self.name} goes to a host's queue: name the host")
        celery.send_task(
            self.name,
            kwargs=kwargs,
            queue=self.queue or host_queue(host or ""),
            expires=expires_s if expires_s is not None else self.expires_s,
            countdown=countdown,
            # Celery logs a repr of the arguments; an execution's record is long and says
            # nothing an id does not, so only the first argument (an id) is shown.
            argsrepr="()",
            kwargsrepr=repr(kwargs[self.arguments[0]]) if self.arguments else "{}",
        )


CREATE_SESSION = Task("shoal.create_session", ("session_id", "pool_name", "reply_key"))
DESTROY_SESSION = Task("shoal.destroy_session", ("session_id",))
SLEEP_SESSION = Task("shoal.sleep_session", ("session_id", "pool_name"))
WAKE_SESSION = Task("shoal.wake_session", ("session_id", "pool_name"))
FORK_SESSION = Task(
    "shoal.fork_session", ("session_id", "pool_name", "fork_ids", "reply_key", "reuse")
)
EXECUTE = Task("shoal.execute", ("execution_id", "pool_name", "record_json"))
CANCEL = Task("shoal.cancel", ("execution_id",))
FILE_OP = Task("shoal.file_op", ("session_id", "op", "args", "reply_key", "pool_name"))
PUT_FILE = Task("shoal.put_file", ("session_id", "transfer_id", "path", "reply_key", "pool_name"))
GET_FILE = Task("shoal.get_file", ("session_id", "transfer_id", "path", "reply_key", "pool_name"))
REPLENISH = Task("shoal.replenish", (), expires_s=REPLENISH_EXPIRY_S)
DELIVER_WEBHOOK = Task("shoal.deliver_webhook", ("owner_id",), WEBHOOK_QUEUE, None)
RUN_BATCH = Task("shoal.run_batch", ("batch_id",), BATCH_QUEUE, None)


def create_wait_s(settings: Settings) -> float:
    """How long the creator of a session waits for its host to give it a VM."""
    return settings.agent_ready_timeout_s + CREATE_MARGIN_S


def fork_wait_s(settings: Settings, count: int) -> float:
    """How long the creator of `count` forks waits for them: the parent's execution running
    when they are asked for (the capture waits for it), the capture, then each fork's start
    (FORK_START_S each, beyond what one VM's start may take)."""
    longest_execution = settings.max_timeout_s + settings.interrupt_grace_s
    return create_wait_s(settings) + longest_execution + FORK_START_S * count


def execution_wait_s(settings: Settings, timeout_s: float) -> float:
    """How long a waiter gives an execution of `timeout_s` before it stops waiting."""
    return timeout_s + settings.interrupt_grace_s + EXECUTION_WAIT_MARGIN_S
