"""Packing runs onto one worker by memory (issue #18, part 4; docs/packing.md).

A worker with STUDIO_WORKER_CONCURRENCY = N > 1 runs Celery's thread pool with N
threads. Each thread that receives a run:

1. works out the run's **memory budget** for this worker's device kind, before
   claiming it (the run's row is still `queued`):
   - `estimate` E: `workers.this_worker.device_estimate` of the run's config (CPU: no
     CUDA context); the submit estimate when the estimator does not know the model.
   - `cap` = E × (1 + margin) + 160 MiB (STUDIO_WORKER_MEMORY_MARGIN, default 0.2).
     The margin is the issue's "exceeds its estimate by more than the margin"; the
     fixed 160 MiB is what a run process holds that no estimate row shows (libraries'
     set-up on the first steps, oneDNN and allocator caches, the final evaluation's
     batches and generations), measured by bench/run_process_memory.py: twice the
     largest residual it found.
   - `reservation` = cap + the process's own memory P: STUDIO_WORKER_PROCESS_MB when
     set; on CUDA 0 (E is device memory); on CPU, where interpreter, libraries,
     tokenizer and tokenized data live in the memory the runs share, the largest
     baseline this worker's children have reported (measured), 640 MiB before the
     first one has (the bench measured 542-569 MiB).
2. waits, first come first served, until its reservation fits beside the runs
   already reserved: Σ reservations ≤ the worker's memory (device_report's
   total_memory, capped by STUDIO_WORKER_MEMORY_GB). A run whose reservation alone
   exceeds the worker's memory does not wait forever: it reserves the whole
   worker once nothing else is reserved, and runs alone (routing by the submit
   estimate normally keeps such runs away). A distributed run (world size > 1)
   always reserves the whole worker and is not capped (its ranks are the budget).
3. starts one process for the run, `python -m workers.run_child` (a fresh
   interpreter: forking a process that has run torch's OpenMP pool deadlocks the
   child in its first parallel kernel, which a forkserver with the training stack
   preloaded was seen to do), which calls the
   unchanged `workers.tasks.execute_run` (claim by token, heartbeats, cancel,
   checkpoints, publish, finish). On CUDA the child caps its allocator at
   cap / device memory (`torch.cuda.set_per_process_memory_fraction`) and reports
   a CUDA out-of-memory error as out of its budget. On CPU this thread watches the
   child every 0.2 s: the resident memory (VmRSS) of the child and its
   descendants, minus the child's **baseline**, which the child reports when
   `prepare_run` returns: its resident memory then, less the bytes of the model's
   tensors (parameters and buffers). The baseline is the process's own overhead,
   which P reserved; the model's tensors and everything training adds on top are
   the run's, which the cap bounds. Above the cap the child is killed and the run
   marked failed "out of its memory budget" with the figures (measured, estimate,
   margin), in one transaction and only while the run is still `running` under
   that child's pid. Spikes shorter than the sampling interval are not seen.
4. A child that dies any other way (signal, crash, the kernel's OOM killer) leaves
   its run failed with the exit code, or requeued while training.retries allows,
   as the reaper does; never `running`. Warm shutdown is forwarded to the children
   (SIGTERM): each checkpoints and requeues its run as execute_run does. A child
   asks the kernel for SIGTERM when the worker dies (PR_SET_PDEATHSIG).

STUDIO_WORKER_CONCURRENCY defaults to 4 on a CUDA worker and 1 on a CPU worker
(runs on one CPU compete for the same cores, so packing buys memory use, not
time). With 1 the worker is exactly what it was: Celery's solo pool, the run
trained in the worker's own process, no budget.

Visibility: each worker's concurrency and reserved bytes are kept in this module
(`state()`) and reported with its presence; `studio.service.list_workers` adds the
ids of the runs the worker is running (from the runs table).
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Optional

from sqlalchemy import select as sql_select, update

from . import db
from .settings import Settings

log = logging.getLogger("peft_studio.packing")

MIB = 1024 ** 2
GIB = 1024 ** 3
# What a run's process holds beyond its estimate's rows, measured by bench/run_process_memory.py
# (bench/RESULTS-run-process.md): above its baseline, a tiny-llama LoRA run peaked 76-79 MiB over its
# estimate (libraries' set-up on the first steps, oneDNN and allocator caches, and ~60 MiB in the
# final evaluation's generations), tiny-bert 27 MiB. Twice the largest, for allocator variance.
RUN_SLACK_BYTES = 160 * MIB
# A CPU child's own memory (interpreter, torch, transformers, tokenizer, tokenized data) until the
# worker has measured one: the baseline its children reported there was 542-569 MiB.
CPU_PROCESS_MB = 640.0
WATCH_INTERVAL_S = 0.2
BUDGET_ERROR = "out of its memory budget"
_ESTIMATE_LOCK = threading.Lock()
_BASELINE_LOCK = threading.Lock()


def device_kind(device: str) -> str:
    return "cuda" if str(device).lower().startswith("cuda") else "cpu"


def default_concurrency(settings: Settings, device: str) -> int:
    """STUDIO_WORKER_CONCURRENCY, else 4 on a CUDA worker and 1 on a CPU worker."""
    if settings.worker_concurrency is not None:
        return settings.worker_concurrency
    return 4 if device_kind(device) == "cuda" else 1


def process_bytes(settings: Settings, device: str) -> int:
    """The memory a run's own process takes beside its budget: STUDIO_WORKER_PROCESS_MB
    when set; on CUDA 0 (the budget is device memory); on CPU the largest baseline a
    child of this worker has reported (measured), and CPU_PROCESS_MB before any has."""
    mb = settings.worker_process_mb
    if mb is not None:
        return int(mb * MIB)
    if device_kind(device) != "cpu":
        return 0
    return _STATE.get("measured_process") or int(CPU_PROCESS_MB * MIB)


def note_baseline(nbytes: int) -> None:
    """A child reported its baseline: later reservations take the largest seen."""
    with _BASELINE_LOCK:
        _STATE["measured_process"] = max(int(nbytes), _STATE.get("measured_process") or 0)


def gib(b: Optional[int]) -> str:
    return "unknown" if b is None else f"{b / GIB:.3f} GiB"


@dataclass(frozen=True)
class Budget:
    """One run's memory on this worker, in bytes (see the module docstring)."""

    estimate: Optional[int]        # the estimate for this device kind (None: unknown)
    estimate_source: str           # "cpu" / "cuda" estimate, or "submit" (the routing figure)
    margin: float
    cap: Optional[int]             # the most the run may use; None: not capped
    reservation: int               # what packing holds for it (cap + the process's own memory)
    exclusive: bool                # runs alone on the worker

    def describe(self) -> str:
        if self.cap is None:
            return f"reserves {gib(self.reservation)} (the whole worker), not capped"
        return (f"estimate {gib(self.estimate)} ({self.estimate_source}) + {self.margin:.0%} margin + "
                f"{RUN_SLACK_BYTES // MIB} MiB = cap {gib(self.cap)}; reserves {gib(self.reservation)}"
                + (" (the whole worker: runs alone)" if self.exclusive else ""))


def run_budget(settings: Settings, config: dict, device: str, total: int,
               submit_estimate: Optional[int] = None) -> Budget:
    """The budget of a run with config `config` on a worker of `total` bytes."""
    from .queue import world_size_of

    m = settings.worker_memory_margin
    if world_size_of(config) > 1:
        return Budget(None, "none", m, None, total, True)
    est, source = None, device_kind(device)
    try:
        from engine.config import parse_run_config

        from .this_worker import device_estimate

        cfg = parse_run_config(config)
        with _ESTIMATE_LOCK:   # transformers' lazy imports are not thread-safe on first use
            est = int(device_estimate(cfg, cfg.model, device)["rows"]["total"])
    except Exception as e:   # a model the estimator does not know by name: the routing figure
        log.info("no %s estimate for packing (%s: %s); using the submit estimate", source, type(e).__name__, e)
        est, source = submit_estimate, "submit"
    if not est:
        return Budget(None, "none", m, None, total, True)
    cap = int(est * (1 + m)) + RUN_SLACK_BYTES
    want = cap + process_bytes(settings, device)
    return Budget(est, source, m, cap, min(want, total), want >= total)


class MemoryBudget:
    """Reservations against `total` bytes, granted first come first served: a
    request waits until every earlier one is granted and it fits beside the
    reservations held (or, larger than `total`, until nothing is held)."""

    def __init__(self, total: int):
        self.total = int(total)
        self.held: dict[int, int] = {}
        self._cond = threading.Condition()
        self._line: collections.deque = collections.deque()

    def reserved(self) -> int:
        with self._cond:
            return sum(self.held.values())

    def acquire(self, key: int, nbytes: int, give_up: threading.Event, poll_s: float = 0.5) -> bool:
        """Hold `nbytes` for `key`; False (nothing held) when `give_up` is set first."""
        ticket = object()
        with self._cond:
            self._line.append(ticket)
            try:
                while True:
                    if give_up.is_set():
                        return False
                    used = sum(self.held.values())
                    if self._line[0] is ticket and (used + nbytes <= self.total or not self.held):
                        self.held[key] = nbytes
                        return True
                    self._cond.wait(poll_s)
            finally:
                self._line.remove(ticket)
                self._cond.notify_all()

    def release(self, key: int) -> None:
        with self._cond:
            self.held.pop(key, None)
            self._cond.notify_all()


# ------------------------------------------------------------------ the worker's packing state

_STATE: dict = {}


def configure(settings: Settings, device: str, total_memory: Optional[int], concurrency: int) -> None:
    """Called once by the worker process (studio.runtime.run_worker)."""
    _STATE.clear()
    _STATE.update(concurrency=concurrency, device=device, settings=settings,
                  budget=MemoryBudget(total_memory or 1 << 62) if concurrency > 1 else None)   # unknown: no limit


def state() -> dict:
    """{"concurrency", "reserved_memory"} of this worker process (concurrency 1 when not packing)."""
    b = _STATE.get("budget")
    return {"concurrency": _STATE.get("concurrency", 1), "reserved_memory": b.reserved() if b else 0}


def packing() -> bool:
    return _STATE.get("budget") is not None


def publish_state(settings: Settings, name: str) -> None:
    """Write this worker's concurrency and reserved bytes onto its row (the presence
    loop creates the row; until it exists there is nothing to update)."""
    st = state()
    try:
        with db.transaction(settings.database_url) as s:
            s.execute(update(db.WorkerRow).where(db.WorkerRow.name == name).values(
                concurrency=st["concurrency"], reserved_memory=st["reserved_memory"] if packing() else None))
    except Exception as e:   # shown a beat late; never a reason to fail a run
        log.warning("could not record the worker's packing state: %s", e)


def presence_loop(settings: Settings, name: str, stop: threading.Event) -> None:
    while not stop.wait(min(2.0, settings.heartbeat_interval_s)):
        publish_state(settings, name)


# ------------------------------------------------------------------ one packed run

def run_packed(run_id: int, token: Optional[int], settings: Settings) -> str:
    """The Celery task body on a packing worker: reserve, run in a child, watch, settle."""
    from .this_worker import SHUTDOWN

    budget_pool: MemoryBudget = _STATE["budget"]
    device = _STATE["device"]
    with db.transaction(settings.database_url) as s:
        row = s.execute(sql_select(db.Run.status, db.Run.queue_token, db.Run.config, db.Run.estimated_peak_bytes)
                        .where(db.Run.id == run_id)).one_or_none()
    if row is None or row[0] != "queued" or (token is not None and row[1] != token):
        log.info("run %s: not started by this message (status %s, token %s)", run_id, row[0] if row else "missing",
                 token)
        return row[0] if row else "missing"
    b = run_budget(settings, row[2], device, budget_pool.total, row[3])
    log.info("run %s: %s; waiting for it to fit (%s of %s reserved)", run_id, b.describe(),
             gib(budget_pool.reserved()), gib(budget_pool.total))
    if not budget_pool.acquire(run_id, b.reservation, SHUTDOWN):
        return _give_back(settings, run_id, token)
    from .this_worker import worker_name

    publish_state(settings, worker_name())
    try:
        return _run_child(settings, run_id, token, b)
    finally:
        budget_pool.release(run_id)
        publish_state(settings, worker_name())


def _give_back(settings: Settings, run_id: int, token: Optional[int]) -> str:
    """The worker stops while this run waited for memory: its message is consumed,
    so the run goes back to the queue with a new one (if it is still ours to give)."""
    from .queue import requeue_run

    with db.transaction(settings.database_url) as s:
        now = s.execute(sql_select(db.Run.status, db.Run.queue_token).where(db.Run.id == run_id)).one_or_none()
    if now and now[0] == "queued" and (token is None or now[1] == token):
        requeue_run(settings, run_id, ("queued",))
        log.info("run %s: worker shutting down before the run fitted; sent back to the queue", run_id)
    return "queued"


def _run_child(settings: Settings, run_id: int, token: Optional[int], b: Budget) -> str:
    from multiprocessing.connection import Connection

    from .this_worker import SHUTDOWN

    r, w = os.pipe()
    cmd = [sys.executable, "-m", "workers.run_child", str(run_id), "--fd", str(w), "--parent", str(os.getpid())]
    if token is not None:
        cmd += ["--token", str(token)]
    if b.cap is not None:
        cmd += ["--cap", str(b.cap)]
    try:
        proc = subprocess.Popen(cmd, pass_fds=(w,), close_fds=True)
    finally:
        os.close(w)
    here = Connection(r, writable=False)
    log.info("run %s: child process %s started", run_id, proc.pid)
    baseline: Optional[int] = None
    status: Optional[str] = None
    forwarded = False
    over: Optional[int] = None

    def drain(timeout: float) -> None:
        nonlocal baseline, status
        try:
            while here.poll(timeout):
                timeout = 0
                msg = here.recv()
                if msg.get("kind") == "prepared":
                    baseline = int(msg["baseline"])
                    note_baseline(baseline)
                    log.info("run %s: prepared; process baseline %s, model tensors %s", run_id,
                             gib(baseline), gib(msg.get("tensors")))
                elif msg.get("kind") == "done":
                    status = msg.get("status")
        except (EOFError, OSError):
            time.sleep(timeout)

    try:
        while True:
            drain(WATCH_INTERVAL_S)
            if proc.poll() is not None:
                break
            if SHUTDOWN.is_set() and not forwarded:
                forwarded = True
                _signal(proc.pid, signal.SIGTERM)
            if b.cap is not None and baseline is not None and device_kind(_STATE["device"]) == "cpu":
                used = tree_rss(proc.pid) - baseline
                if used > b.cap:
                    over = used
                    kill_tree(proc.pid)
                    break
    finally:
        if proc.poll() is None and over is None and not SHUTDOWN.is_set():
            kill_tree(proc.pid)
        proc.wait()
        drain(0)
        here.close()
    if over is not None:
        why = budget_message(over, b, measured_kind="resident memory above the process baseline")
        log.error("run %s: %s", run_id, why)
        return settle(settings, run_id, proc.pid, token, why, retry=False) or "failed"
    code = proc.returncode
    if code == 0 and status:
        return status
    how = (f"was killed by signal {-code} ({signal.Signals(-code).name})" if code < 0 and -code in
           signal.Signals._value2member_map_ else f"exited with code {code}")
    why = f"the process training this run (pid {proc.pid}) {how}"
    log.error("run %s: %s", run_id, why)
    return settle(settings, run_id, proc.pid, token, why, retry=True) or status or "failed"


def budget_message(measured: int, b: Budget, measured_kind: str) -> str:
    return (f"{BUDGET_ERROR}: it used {gib(measured)} ({measured_kind}), more than its cap of {gib(b.cap)} = "
            f"estimate {gib(b.estimate)} ({b.estimate_source}) + margin {b.margin:.0%} + "
            f"{RUN_SLACK_BYTES // MIB} MiB; it was stopped so the runs beside it keep their memory. Lower "
            f"batch_size or max_seq_len, or raise STUDIO_WORKER_MEMORY_MARGIN")


def settle(settings: Settings, run_id: int, pid: int, token: Optional[int], why: str, *,
           retry: bool) -> Optional[str]:
    """After a child ended badly: its run, if still `running` under that child (or
    still `queued` for this message: the child died before its claim), is failed
    with `why`, or requeued while `retry` and training.retries allow. One
    transaction; returns the run's new status, or None when it was no longer ours."""
    from .queue import send, world_size_of
    from .this_worker import worker_name

    sent = None
    with db.transaction(settings.database_url) as s:
        run = s.get(db.Run, run_id)
        if run is None:
            return None
        if run.status == "queued" and token is not None and run.queue_token == token:
            s.execute(update(db.Run).where(db.Run.id == run_id, db.Run.status == "queued",
                                           db.Run.queue_token == token)
                      .values(status="failed", finished_at=db.utcnow(), error=f"{why} before it started the run"))
            return "failed"
        if run.status != "running" or run.worker_pid != pid or run.worker_host != worker_name():
            return None
        retries = int(((run.config or {}).get("training") or {}).get("retries", 0) or 0)
        if retry and (run.attempts or 0) <= retries:
            new = db.requeue(s, run_id, ("running",),
                             reason=f"requeued (attempt {run.attempts} of {retries + 1}): {why}")
            if new is not None:
                sent = (new, run.priority or 0, run.estimated_peak_bytes, world_size_of(run.config))
        elif not db.finish_run(s, run_id, "failed", error=why[:4000]):
            return None
    if sent:
        send(settings, run_id, *sent)
        return "queued"
    return "failed"


# ------------------------------------------------------------------ processes

def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (Linux /proc)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            continue
    return out


def rss_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_rss(pid: int) -> int:
    return sum(rss_of(p) for p in descendants(pid))


def kill_tree(pid: int) -> None:
    for p in reversed(descendants(pid)):
        _signal(p, signal.SIGKILL)
