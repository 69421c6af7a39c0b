"""What the `webhooks` and `batches` workers load: the Celery app with only the asynchronous
tasks (workers/async_tasks.py), not the host runtime of workers/worker_app.py."""

from shoal.celery_app import celery_for
from shoal.settings import load
from workers import async_tasks  # noqa: F401  (registers the tasks)

app = celery_for(load())
