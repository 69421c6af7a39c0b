"""What `celery -A workers.worker_app worker` and `... beat` load: the app with its tasks."""

from shoal.settings import load
from workers import tasks  # noqa: F401  (registers the tasks)
from workers.celery_app import celery_for

app = celery_for(load())
