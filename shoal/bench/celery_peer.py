"""The throwaway Celery app of the `celery_noop` peer: a no-op task with the Redis result
backend, so `delay().get()` is one full round trip. Its worker runs as
`celery -A shoal.bench.celery_peer worker -P solo`, configured by the two variables below."""

from __future__ import annotations

import os

from celery import Celery

URL_ENV = "SHOAL_BENCH_CELERY_URL"
QUEUE_ENV = "SHOAL_BENCH_CELERY_QUEUE"


def make_app(url: str, queue: str) -> Celery:
    app = Celery("shoal_bench_peer", broker=url, backend=url)
    app.conf.update(
        task_default_queue=queue,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_expires=600,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
    )

    @app.task(name="bench.noop", shared=False)
    def noop() -> None:
        return None

    return app


app = make_app(
    os.environ.get(URL_ENV, "redis://127.0.0.1:6379/15"),
    os.environ.get(QUEUE_ENV, "shoal-bench-peer"),
)
