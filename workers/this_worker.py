"""What a worker process knows of itself: its name, the flag set when it is asked to stop,
a run's estimate for the kind of device it trains on, and the heartbeat thread that tells the
database a run or a job it holds is alive. Below both the task that trains
(workers.tasks) and the packer that shares the worker between runs (workers.packing), so
neither has to import the other."""

from __future__ import annotations

import logging
import os
import threading
from typing import Callable

from . import db

log = logging.getLogger("peft_studio.worker")

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


class Beating:
    """`beat(session)` in a transaction every heartbeat interval (at most a second apart),
    from a background thread, while the `with` block runs. A failed beat (a database blip)
    is logged and retried at the next: it must not kill the work it reports on."""

    def __init__(self, settings, what: str, beat: Callable):
        self.settings, self.what, self.beat = settings, what, beat
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True, name=f"heartbeat-{what}")

    def _loop(self):
        while not self._stop.wait(min(1.0, self.settings.heartbeat_interval_s)):
            try:
                with db.transaction(self.settings.database_url) as s:
                    self.beat(s)
            except Exception as e:
                log.warning("%s: heartbeat failed: %s", self.what, e)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(timeout=10)
