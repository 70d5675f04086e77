"""What a worker process knows of itself: its name, the flag set when it is asked to stop,
and a run's estimate for the kind of device it trains on. Below both the task that trains
(workers.tasks) and the packer that shares the worker between runs (workers.packing), so
neither has to import the other."""

from __future__ import annotations

import os
import threading

from . import db

SHUTDOWN = threading.Event()   # set when this worker is asked to stop (warm shutdown)


def worker_name() -> str:
    return os.environ.get("STUDIO_WORKER_NAME") or f"worker-{os.getpid()}@{db.hostname()}"


def device_estimate(cfg, model_config, device: str) -> dict:
    """The run's estimate for the kind of device this worker trains on (a CPU worker:
    `device='cpu'`, no CUDA context), from the config of the model it loaded (a
    config.json dict) or a model name the estimator knows."""
    from engine.estimator import estimate_run, run_estimate_json

    num_labels = 2
    if isinstance(model_config, dict):
        num_labels = max(2, len(model_config.get("id2label") or {}))
    return run_estimate_json(estimate_run(cfg, model_config, device=device, num_labels=num_labels))
