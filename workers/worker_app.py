"""What `celery -A workers.worker_app worker` and `... beat` load: the app with its tasks."""

import logging

from shoal.celery_app import celery_for
from shoal.settings import load
from workers import tasks  # noqa: F401  (registers the tasks)

# Celery's "Task ... received" line is written by the consumer before it hands the task to a
# pool thread, on every execution's path; the runtime logs each execution, session and file
# operation itself (logger shoal.host), and Celery still logs task failures.
for _name in ("celery.worker.strategy", "celery.app.trace"):
    logging.getLogger(_name).setLevel(logging.WARNING)

app = celery_for(load())
