"""Processes: a Celery worker (`peft-studio worker`) and the embedded worker that
`serve` starts and supervises when no broker is configured."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Optional

from workers import db
from workers.settings import Settings, load_settings

log = logging.getLogger("peft_studio.runtime")


def prepare_database(settings: Settings) -> None:
    """Create the data dir and bring the schema to head (idempotent)."""
    settings.ensure_dirs()
    db.upgrade(settings.database_url)


def store_problem(settings: Settings) -> Optional[str]:
    """None when the artifact store takes a write, read and delete; else the error
    (it names the store by its URL with secrets redacted)."""
    from workers.store import StoreError, get_store

    try:
        get_store(settings).check()
    except StoreError as e:
        return str(e)
    return None


def run_worker(name: Optional[str] = None, loglevel: str = "INFO") -> int:
    """A Celery worker consuming the studio queue. With STUDIO_WORKER_CONCURRENCY 1
    (a CPU worker's default), one run at a time (solo pool: training runs in the
    main thread; cancellation is cooperative). With N > 1 (a CUDA worker's default
    is 4), a thread pool of N: each run in its own process, as many at once as their
    memory budgets fit (workers.packing, docs/packing.md)."""
    try:
        settings = load_settings()
    except ValueError as e:   # a bad STUDIO_WORKER_* setting
        print(f"error: {e}", file=sys.stderr)
        return 2
    problem = store_problem(settings)
    if problem:
        log.error("worker not started: %s", problem)
        print(f"error: {problem}; set STUDIO_ARTIFACT_URL (and STUDIO_S3_ENDPOINT_URL / AWS credentials for s3://)",
              file=sys.stderr)
        return 2
    if settings.database_url.startswith("sqlite"):
        prepare_database(settings)
    name = name or f"worker-{os.getpid()}@{db.hostname()}"
    os.environ["STUDIO_WORKER_NAME"] = name
    from workers.celery_app import app
    from workers.queue import worker_queues
    from workers.tasks import device_report, presence_loop

    try:
        rep = device_report()
    except ValueError as e:   # a bad STUDIO_WORKER_DEVICES
        print(f"error: {e}", file=sys.stderr)
        return 2
    ray_address = os.environ.get("STUDIO_RAY_ADDRESS") or None
    queues = worker_queues(settings, rep["total_memory"], rep["devices"], rep["device_memory"], ray=bool(ray_address))
    from workers import packing

    concurrency = packing.default_concurrency(settings, rep["device"])
    packing.configure(settings, rep["device"], rep["total_memory"], concurrency)
    log.info("worker %s: %s, %d device(s)%s; queues %s; %s", name, rep["device"], rep["devices"],
             f", distributed runs go to the Ray cluster at {ray_address}" if ray_address else "", ",".join(queues),
             "one run at a time" if concurrency == 1 else
             f"up to {concurrency} runs at once within {rep['total_memory'] / 1024 ** 3:.2f} GiB "
             f"(margin {settings.worker_memory_margin:.0%})")
    pool = ["--pool=solo", "--concurrency=1"] if concurrency == 1 else ["--pool=threads", f"--concurrency={concurrency}"]

    stop = threading.Event()
    threading.Thread(target=presence_loop, args=(settings, name, stop), daemon=True, name="presence").start()
    threading.Thread(target=packing.presence_loop, args=(settings, name, stop), daemon=True,
                     name="packing-presence").start()
    try:
        app.worker_main(["worker", *pool, f"--hostname={name}",
                         f"--queues={','.join(queues)}", f"--loglevel={loglevel}", "--without-gossip",
                         "--without-mingle", "--without-heartbeat"])
    finally:
        stop.set()
    return 0


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the parent dies (Linux), so no orphan workers."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except OSError:
        pass


class WorkerSupervisor:
    """Starts the embedded worker, restarts it when it dies (failing the run it was
    training right away), and stops it with the studio."""

    def __init__(self, settings: Settings, restart_delay: float = 2.0):
        self.settings = settings
        self.restart_delay = restart_delay
        self.proc: Optional[subprocess.Popen] = None
        self.name = ""
        self.restarts = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="worker-supervisor")

    def _spawn(self) -> None:
        self.name = f"embedded-{os.getpid()}-{self.restarts}@{db.hostname()}"
        cmd = [sys.executable, "-m", "studio.cli", "worker", "--name", self.name]
        self.proc = subprocess.Popen(cmd, preexec_fn=_die_with_parent, env=os.environ.copy())
        log.info("embedded worker %s started (pid %s)", self.name, self.proc.pid)

    def _loop(self) -> None:
        self._spawn()
        while not self._stop.is_set():
            code = self.proc.poll()
            if code is None:
                self._stop.wait(0.5)
                continue
            if self._stop.is_set():
                break
            log.warning("embedded worker %s exited with code %s; restarting", self.name, code)
            try:
                from workers.queue import reap_and_requeue
                reap_and_requeue(self.settings, 0, host=self.name,
                                 reason=f"the worker training this run exited (code {code})")
            except Exception as e:
                log.error("could not mark the dead worker's runs failed: %s", e)
            self.restarts += 1
            if self._stop.wait(self.restart_delay):
                break
            self._spawn()

    def start(self) -> "WorkerSupervisor":
        self._thread.start()
        return self

    def stop(self, timeout: float = 15.0) -> None:
        self._stop.set()
        p = self.proc
        if p and p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self._thread.join(timeout=5)


def reaper_loop(settings: Settings, stop: threading.Event) -> None:
    """Fail runs whose worker stopped sending heartbeats (also done by workers)."""
    while not stop.wait(min(10.0, settings.heartbeat_interval_s)):
        try:
            from workers.queue import ensure_broker_epoch, reap_and_requeue
            reap_and_requeue(settings, settings.heartbeat_timeout_s)
            ensure_broker_epoch(settings)
        except Exception as e:
            log.warning("reaper: %s", e)
