"""Gathering concurrent serving requests into batches (engine.serving.run_rows).

A server thread per request calls `Batcher.submit(key, compute, rows)` and waits for
its results. Requests that arrive within `window_s` of the first waiting one, for
the same `key` (one model: a base, or one run's view of it), are run together as
one `compute(all_rows)` call, so N concurrent requests cost one batched decode
instead of N decodes one after another. One thread runs the batches, one at a
time (the models of one studio share a CPU or a device; a base is shared by its
views anyway). `batches` and `requests` count what it ran.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Hashable

log = logging.getLogger(__name__)

Compute = Callable[[list], list]


@dataclass
class _Job:
    rows: list
    future: Future
    compute: Compute


class Batcher:
    def __init__(self, window_s: float = 0.01, max_rows: int = 64):
        self.window_s, self.max_rows = window_s, max_rows
        self._cv = threading.Condition()
        self._pending: "OrderedDict[Hashable, list[_Job]]" = OrderedDict()
        self._thread: threading.Thread | None = None
        self.batches = 0          # compute calls made
        self.requests = 0         # submits answered

    def submit(self, key: Hashable, compute: Compute, rows: list) -> Future:
        """Queue `rows` for model `key`; the future resolves to their results, in order.
        `compute(rows) -> results` runs the batch (the first waiting job's is used for
        the whole batch: every job of one key computes with the same model)."""
        fut: Future = Future()
        with self._cv:
            self._pending.setdefault(key, []).append(_Job(list(rows), fut, compute))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="serve-batcher", daemon=True)
                self._thread.start()
            self._cv.notify()
        return fut

    def run(self, key: Hashable, compute: Compute, rows: list, timeout: float | None = None) -> list:
        return self.submit(key, compute, rows).result(timeout)

    def _take(self) -> tuple[Hashable, list[_Job]]:
        """The oldest key's waiting jobs, up to max_rows rows (always at least one job)."""
        key = next(iter(self._pending))
        jobs, waiting, n = [], self._pending[key], 0
        while waiting and (not jobs or n + len(waiting[0].rows) <= self.max_rows):
            job = waiting.pop(0)
            jobs.append(job)
            n += len(job.rows)
        if not waiting:
            del self._pending[key]
        return key, jobs

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._pending:
                    self._cv.wait()
            time.sleep(self.window_s)        # let the requests that arrive together join
            with self._cv:
                key, jobs = self._take()
            self._run(key, jobs)

    def _run(self, key: Hashable, jobs: list[_Job]) -> None:
        rows = [r for j in jobs for r in j.rows]
        try:
            results: list[Any] = jobs[0].compute(rows)
        except BaseException as e:   # every waiting caller gets the error; the thread goes on
            log.warning("serving batch for %r failed: %s: %s", key, type(e).__name__, e)
            for j in jobs:
                j.future.set_exception(e)
            return
        finally:
            self.batches += 1
        at = 0
        for j in jobs:
            j.future.set_result(results[at:at + len(j.rows)])
            at += len(j.rows)
        self.requests += len(jobs)
