"""The Celery task of a benchmark job (workers.benchmarks does the work)."""

from __future__ import annotations

from typing import Optional

from .celery_app import app


@app.task(name="studio.benchmark", acks_late=True)
def benchmark(job_id: int, token: Optional[int] = None) -> str:
    """One queued benchmark job, in this worker process."""
    from .benchmarks import execute_benchmark

    return execute_benchmark(int(job_id), app.conf.studio_settings, None if token is None else int(token))
