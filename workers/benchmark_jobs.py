"""The states of a benchmark job (table `benchmark_jobs`; workers.benchmarks runs them):
queued -> running -> succeeded | failed, queued -> cancelled. Every transition is a
conditional UPDATE, so two workers never both start, or both finish, a job; the reaper
fails a running job whose worker stopped sending heartbeats. Database only: the queue
(workers.queue) reaps through it without importing the harness side."""

from __future__ import annotations

import datetime as dt
from typing import Optional

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from . import db


class BenchmarkRequestError(ValueError):
    """A benchmark request that cannot be accepted; the message names the field."""


def create_job(s: Session, *, run_id: Optional[int], model: str, seed: Optional[int], owner: Optional[str],
               tasks: list[str], user_tasks: list[dict], limit: Optional[float],
               num_fewshot: Optional[int]) -> db.BenchmarkJob:
    if not tasks and not user_tasks:
        raise BenchmarkRequestError("tasks: name at least one task (or give user_tasks)")
    job = db.BenchmarkJob(run_id=run_id, model=model, seed=seed, owner=owner, status="queued", tasks=tasks,
                          user_tasks=user_tasks or None, limit=limit, num_fewshot=num_fewshot)
    s.add(job)
    s.flush()
    return job


def claim_job(s: Session, job_id: int, token: Optional[int], host: str, pid: int) -> bool:
    """queued -> running, once across all workers, for the message with the current token."""
    now = db.utcnow()
    cond = [db.BenchmarkJob.id == job_id, db.BenchmarkJob.status == "queued"]
    if token is not None:
        cond.append(db.BenchmarkJob.queue_token == token)
    res = s.execute(update(db.BenchmarkJob).where(*cond).values(
        status="running", started_at=now, heartbeat_at=now, worker_host=host, worker_pid=pid, error=None))
    return res.rowcount == 1


def finish_job(s: Session, job_id: int, status: str, error: Optional[str] = None) -> bool:
    res = s.execute(update(db.BenchmarkJob).where(db.BenchmarkJob.id == job_id,
                                                  db.BenchmarkJob.status == "running").values(
        status=status, finished_at=db.utcnow(), error=error, phase=None))
    return res.rowcount == 1


def beat(s: Session, job_id: int, **values) -> None:
    s.execute(update(db.BenchmarkJob).where(db.BenchmarkJob.id == job_id, db.BenchmarkJob.status == "running")
              .values(heartbeat_at=db.utcnow(), **values))


def cancel_job(s: Session, job_id: int) -> Optional[str]:
    """A queued job is cancelled at once; a running one finishes (None: unknown job)."""
    job = s.get(db.BenchmarkJob, job_id)
    if job is None:
        return None
    s.execute(update(db.BenchmarkJob).where(db.BenchmarkJob.id == job_id, db.BenchmarkJob.status == "queued")
              .values(status="cancelled", finished_at=db.utcnow()))
    s.flush()
    s.refresh(job)
    return job.status


def reap_stale_benchmarks(s: Session, timeout_s: float, *, host: Optional[str] = None,
                          reason: Optional[str] = None) -> list[int]:
    """Jobs still `running` whose heartbeat is older than `timeout_s` (or every running job
    of `host` when timeout_s is 0) lost their worker: they are failed. Returns their ids."""
    cutoff = db.utcnow() - dt.timedelta(seconds=timeout_s)
    q = select(db.BenchmarkJob.id, db.BenchmarkJob.worker_host, db.BenchmarkJob.heartbeat_at).where(
        db.BenchmarkJob.status == "running")
    if host is not None:
        q = q.where(db.BenchmarkJob.worker_host == host)
    if timeout_s > 0:
        q = q.where((db.BenchmarkJob.heartbeat_at < cutoff) | (db.BenchmarkJob.heartbeat_at.is_(None)))
    out = []
    for jid, whost, hb in s.execute(q).all():
        when = f"last at {hb:%Y-%m-%d %H:%M:%S} UTC, " if hb else ""
        why = reason or (f"worker {whost} stopped sending heartbeats ({when}timeout {timeout_s:.0f} s); "
                         f"it probably died. Evaluate again.")
        if finish_job(s, jid, "failed", why):
            out.append(jid)
    return out
